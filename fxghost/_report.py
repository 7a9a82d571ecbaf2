"""What the pass did to each normalization layer, for people and for code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate

from . import _distributed, backends

__all__ = ["GhostReport", "LayerRecord", "attach", "detach", "report"]

_META_KEY = "fxghost_report"


@dataclass(frozen=True)
class LayerRecord:
    """One normalization layer (or functional call) the pass looked at.

    Attributes:
        name: the layer's qualified name in the model (its class name for the model itself).
        kind: the layer's class name, or ``"<function> call"`` for a functional call.
        rewritten: whether it was ghosted.
        reason: why it was not ghosted, or what of it was not kept (``""`` for neither).
        num_features: the layer's channels, where it has ``num_features``.
        ghost_batch_size: samples per ghost batch, for a rewritten layer.
        momentum: the layer's momentum when rewritten (``None``: a cumulative average).
        calls: how many times the model calls it (a layer shared by several call sites).
        warn: whether ``transform``'s warning names this layer: not ghosted although it runs
            with batch statistics, or ghosted with something of it not kept.
        layer: the module the rewritten graph passes to the ghost ops (the layer itself, or its
            LayerGraphModule), which records what ran it: copied and pickled with the model,
            since the report is.
        group_size: how many processes its ghost batches span
            (``transform(process_group=...)``), or None.
        epilogue: what its normalization also applies, fused in place of the graph's nodes
            after it: ``"relu"`` (a ReLU), ``"add+relu"`` (a residual add, then a ReLU), or
            ``""`` (nothing); for a layer called at several sites with different epilogues,
            each, ``"none"`` for a site without one (``"relu, none"``).
    """

    name: str
    kind: str
    rewritten: bool
    reason: str
    num_features: int | None = None
    ghost_batch_size: int | None = None
    momentum: float | None = None
    calls: int = 1
    warn: bool = False
    layer: torch.nn.Module | None = field(default=None, compare=False, repr=False)
    group_size: int | None = None
    epilogue: str = ""

    @property
    def backend(self) -> str:
        """Which implementation ran this layer's last call (``""`` before any)."""
        return backends.last_run(self.layer)

    @property
    def group_layout(self) -> str:
        """With a process group: the group's last training batch, its per-process sizes and
        where its ghost batches lay (``""`` before any)."""
        return _distributed.last_layout(self.layer)

    @property
    def status(self) -> str:
        """``"rewritten"`` or ``"skipped"``."""
        return "rewritten" if self.rewritten else "skipped"


@dataclass
class GhostReport:
    """The layers a pass rewrote and those it skipped, with the reason for each.

    ``str(report)`` is its table and summary.

    Attributes:
        ghost_batch_size: samples per ghost batch that the pass was given.
        layers: a [`LayerRecord`][fxghost.LayerRecord] per layer, in the model's order.
        untraced: submodules left as Python code because they do not trace
            (``transform(strict=False)``), each an [`UntracedPart`][fxghost.UntracedPart].

    Examples:
        >>> import torch, fxghost
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> fxghost.report(fxghost.transform(model, ghost_batch_size=16)).rewritten_names
        ['1']
    """

    ghost_batch_size: int
    layers: list[LayerRecord] = field(default_factory=list)
    untraced: list[Any] = field(default_factory=list)

    @property
    def rewritten(self) -> list[LayerRecord]:
        """The records of the layers ghosted."""
        return [r for r in self.layers if r.rewritten]

    @property
    def skipped(self) -> list[LayerRecord]:
        """The records of the layers not ghosted."""
        return [r for r in self.layers if not r.rewritten]

    @property
    def rewritten_names(self) -> list[str]:
        """The qualified names of the layers ghosted."""
        return [r.name for r in self.rewritten]

    def rows(self) -> list[dict[str, object]]:
        """The table's rows.

        Returns:
            One dict per layer, its keys the column headers; the epilogue, backend and
            process-group columns only where a layer has a fused epilogue, has run, or has a
            group.
        """
        ran = any(r.backend for r in self.layers)
        grouped = any(r.group_size for r in self.layers)
        fused = any(r.epilogue for r in self.layers)
        return [
            {
                "layer": r.name,
                "kind": r.kind,
                "channels": "" if r.num_features is None else r.num_features,
                "ghost size": "" if r.ghost_batch_size is None else r.ghost_batch_size,
                "momentum": "None (cumulative)"
                if r.rewritten and r.momentum is None
                else ("" if r.momentum is None else r.momentum),
                "status": r.status,
                **({"epilogue": r.epilogue} if fused else {}),
                **({"backend (last call)": r.backend} if ran else {}),
                **(
                    {"group": r.group_size or "", "ghost batches (last batch)": r.group_layout}
                    if grouped
                    else {}
                ),
                "why": r.reason,
            }
            for r in self.layers
        ]

    def table(self, tablefmt: str = "simple") -> str:
        """The layers as a tabulate table (``tablefmt="github"`` for Markdown).

        Args:
            tablefmt: a ``tabulate`` table format.

        Returns:
            The table, or a line saying that there are no BatchNorm layers.
        """
        if not self.layers:
            return "(no BatchNorm layers found)"
        return tabulate(self.rows(), headers="keys", tablefmt=tablefmt)

    def summary(self) -> str:
        """How many layers were rewritten and skipped, and the submodules not traced, with why.

        Returns:
            A line counting the layers, then a line per submodule not traced.
        """
        text = (
            f"{len(self.rewritten)} layer(s) rewritten with ghost_batch_size="
            f"{self.ghost_batch_size}, {len(self.skipped)} skipped"
        )
        for part in self.untraced:
            text += f"\nnot traced: {part.name}: {part.error}" + (
                f" (at {part.location})" if part.location else ""
            )
        return text

    def warning(self, model_name: str, shown: int = 3) -> str | None:
        """The text of ``transform``'s one warning: how many layers were ghosted, and the first
        few that need attention with why.

        Args:
            model_name: the model's name, for the first line.
            shown: how many of the layers that need attention to name.

        Returns:
            The warning's text; ``None`` when no layer needs attention.
        """
        flagged = [r for r in self.layers if r.warn]
        if not flagged:
            return None
        modules = [r for r in self.layers if not r.kind.endswith(" call")]
        done = sum(r.rewritten for r in modules)
        lines = [
            f"fxghost: ghosted {done} of {len(modules)} BatchNorm layers of {model_name}; "
            f"{len(flagged)} need attention:"
        ]
        for r in flagged[:shown]:
            why = r.reason.split(";")[0]
            lines.append(f"  {r.name or '(root)'} ({r.kind}): {why}")
        if len(flagged) > shown:
            lines.append(f"  and {len(flagged) - shown} more")
        lines.append("fxghost.report(result) lists every layer and why.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"


def report(gm: torch.nn.Module) -> GhostReport:
    """The [`GhostReport`][fxghost.GhostReport] of the pass that produced ``gm``.

    Args:
        gm: a module returned by [`fxghost.transform`][fxghost.transform] or
            [`fxghost.ghost_batchnorm_pass`][fxghost.ghost_batchnorm_pass], or ghosted by
            [`fxghost.apply_ghost_batchnorm`][fxghost.apply_ghost_batchnorm].

    Returns:
        Its report (the same object at each call).

    Raises:
        ValueError: ``gm`` carries no fxghost report.

    Examples:
        >>> import torch, fxghost
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> fxghost.report(fxghost.transform(model, ghost_batch_size=16)).summary()
        '1 layer(s) rewritten with ghost_batch_size=16, 0 skipped'
    """
    found = getattr(gm, "_" + _META_KEY, None)
    if found is None:
        raise ValueError(
            "fxghost: this module carries no fxghost report; it was not produced by "
            "fxghost.transform or fxghost.ghost_batchnorm_pass (or it was re-created since)"
        )
    return found  # type: ignore[no-any-return]


def attach(gm: torch.nn.Module, rep: GhostReport) -> None:
    # A plain attribute (not a submodule, not state): it survives pickling a GraphModule, which
    # re-creates ``meta`` empty.
    object.__setattr__(gm, "_" + _META_KEY, rep)


def detach(module: torch.nn.Module) -> None:
    """Take the report off ``module`` (:func:`fxghost.revert_ghost_batchnorm`)."""
    module.__dict__.pop("_" + _META_KEY, None)
