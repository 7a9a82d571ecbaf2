"""What the pass did to each normalization layer, for people and for code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate

__all__ = ["GhostReport", "LayerRecord", "report"]

_META_KEY = "fxghost_report"


@dataclass(frozen=True)
class LayerRecord:
    """One normalization layer (or functional call) the pass looked at."""

    name: str
    kind: str
    rewritten: bool
    reason: str
    num_features: int | None = None
    ghost_batch_size: int | None = None
    momentum: float | None = None
    calls: int = 1

    @property
    def status(self) -> str:
        return "rewritten" if self.rewritten else "skipped"


@dataclass
class GhostReport:
    """The layers a pass rewrote and those it skipped, with the reason for each.

    >>> import torch, fxghost
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> fxghost.report(fxghost.transform(model, ghost_batch_size=16)).rewritten_names
    ['1']
    """

    ghost_batch_size: int
    layers: list[LayerRecord] = field(default_factory=list)
    #: Submodules left as Python code because they do not trace (``transform(strict=False)``).
    untraced: list[Any] = field(default_factory=list)

    @property
    def rewritten(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.rewritten]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.rewritten]

    @property
    def rewritten_names(self) -> list[str]:
        return [r.name for r in self.rewritten]

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "layer": r.name,
                "kind": r.kind,
                "channels": "" if r.num_features is None else r.num_features,
                "ghost size": "" if r.ghost_batch_size is None else r.ghost_batch_size,
                "momentum": "None (cumulative)" if r.rewritten and r.momentum is None
                else ("" if r.momentum is None else r.momentum),
                "status": r.status,
                "why": r.reason,
            }
            for r in self.layers
        ]

    def table(self, tablefmt: str = "simple") -> str:
        """The layers as a tabulate table (``tablefmt="github"`` for Markdown)."""
        if not self.layers:
            return "(no BatchNorm layers found)"
        return tabulate(self.rows(), headers="keys", tablefmt=tablefmt)

    def summary(self) -> str:
        text = (
            f"{len(self.rewritten)} layer(s) rewritten with ghost_batch_size="
            f"{self.ghost_batch_size}, {len(self.skipped)} skipped"
        )
        for part in self.untraced:
            text += f"\nnot traced: {part.name}: {part.error}" + (
                f" (at {part.location})" if part.location else ""
            )
        return text

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"


def report(gm: torch.nn.Module) -> GhostReport:
    """The :class:`GhostReport` of the pass that produced ``gm``."""
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
