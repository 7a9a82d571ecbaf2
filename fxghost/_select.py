"""Which layers the pass rewrites: registered BatchNorm classes, optionally narrowed by name."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

__all__ = ["BATCHNORM_TYPES", "LayerRule", "LayerSelector", "register_batchnorm", "rule_for"]

BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class LayerRule:
    """How a BatchNorm-like layer is rewritten: ghost normalization with the layer's own
    parameters and statistics, then the layer's submodules named in ``after``, in order."""

    after: tuple[str, ...] = ()


# Keyed by exact class, as ``torch.fx.experimental.optimization.fuse`` matches: a subclass may
# change ``forward`` (SyncBatchNorm, FrozenBatchNorm), so rewriting it unasked would be a guess.
# Third-party classes are keyed by qualified name so that fxghost need not import them.
_RULES: dict[type[nn.Module] | str, LayerRule] = {
    **{cls: LayerRule() for cls in BATCHNORM_TYPES},
    # timm: BatchNorm2d.forward, then self.drop (dropout) and self.act (activation).
    "timm.layers.norm_act.BatchNormAct2d": LayerRule(after=("drop", "act")),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_batchnorm(cls: type[nn.Module], *, after: Iterable[str] = ()) -> type[nn.Module]:
    """Teach fxghost a BatchNorm-like layer: a subclass of ``nn.BatchNorm1d/2d/3d`` whose forward
    is BatchNorm's followed by its submodules ``after`` (e.g. ``("drop", "act")``).

    Layers of exactly this class are then rewritten (and wrapped by the chunked reference, which
    runs the layer's own forward per ghost batch). It works as a decorator.

    Args:
        cls: the layer class, a subclass of ``nn.BatchNorm1d``, ``nn.BatchNorm2d`` or
            ``nn.BatchNorm3d``.
        after: the names of the submodules that ``cls.forward`` applies, in order, to
            BatchNorm's output (a single name may be given as a string).

    Returns:
        ``cls`` itself.

    Raises:
        TypeError: ``cls`` is not a BatchNorm subclass, or ``after`` holds something other than
            submodule names.

    Examples:
    >>> import torch, fxghost
    >>> class BNReLU(torch.nn.BatchNorm1d):
    ...     def __init__(self, n):
    ...         super().__init__(n)
    ...         self.act = torch.nn.ReLU()
    ...     def forward(self, x):
    ...         return self.act(super().forward(x))
    >>> _ = fxghost.register_batchnorm(BNReLU, after=["act"])
    >>> gm = fxghost.transform(torch.nn.Sequential(BNReLU(3)), ghost_batch_size=4)
    >>> fxghost.report(gm).rewritten_names
    ['0']
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.modules.batchnorm._BatchNorm)):
        raise TypeError(
            f"fxghost: register_batchnorm takes a subclass of nn.BatchNorm1d/2d/3d (fxghost "
            f"reads its weight, bias, running statistics, momentum and eps), got {cls!r}"
        )
    names = (after,) if isinstance(after, str) else tuple(after)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"fxghost: after= takes submodule names (str), got {names!r}")
    _RULES[cls] = LayerRule(after=names)
    return cls


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rewrite rule for exactly this module's class, if it has one."""
    cls = type(module)
    rule = _RULES.get(cls)
    return rule if rule is not None else _RULES.get(_qualname(cls))


class LayerSelector:
    """``only``: qualified layer names or glob patterns (``"layer4.*"``); ``None`` selects all."""

    def __init__(self, only: Iterable[str] | str | None) -> None:
        if isinstance(only, str):
            only = [only]
        self.patterns = None if only is None else list(only)
        if self.patterns is not None:
            for p in self.patterns:
                if not isinstance(p, str):
                    raise TypeError(
                        f"fxghost: only= takes layer names or glob patterns (str), got {p!r}"
                    )

    def selects(self, name: str) -> bool:
        if self.patterns is None:
            return True
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def check_all_matched(self, names: Iterable[str]) -> None:
        """A pattern that matches no BatchNorm is almost always a typo: say so rather than
        silently rewriting less than asked."""
        if self.patterns is None:
            return
        names = list(names)
        unmatched = [
            p for p in self.patterns if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)
        ]
        if unmatched:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"fxghost: only={unmatched!r} matches no rewritable BatchNorm layer; "
                f"the candidates are: {shown or '(none)'}"
            )

    def describe(self) -> str:
        return f"only={self.patterns!r}"
