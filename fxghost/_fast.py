"""Choice of the ghost-normalization implementation for a grouped view."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from . import _math

NormFn = Callable[[Tensor, "Tensor | None", "Tensor | None", float], tuple[Tensor, Tensor, Tensor]]


def select(xg: Tensor) -> NormFn:
    return _math.ghost_norm_decomposed
