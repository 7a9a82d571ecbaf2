"""Which layers the pass rewrites: exact BatchNorm classes, optionally narrowed by name."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

__all__ = ["BATCHNORM_TYPES", "LayerSelector"]

#: Matched by exact type, as ``torch.fx.experimental.optimization.fuse`` does: a subclass may
#: change ``forward`` (SyncBatchNorm, timm's BatchNormAct2d), so rewriting it would be a guess.
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
