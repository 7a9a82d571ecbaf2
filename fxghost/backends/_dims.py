"""The dense dims ``(G, A, C, S)`` of a grouped view ``(G, c, C, *spatial)``: how it lies in
memory, the one layout test every backend uses.

Two dense layouts map onto a ``(G, A, C, S)`` block without a copy:

* "rows" (``S == 1``): channels innermost (channels_last, channels_last_3d, tabular ``(N, C)``);
  a group's ``A = c * prod(spatial)`` positions are rows of ``C`` channels;
* "planes": contiguous (NCHW-like, ``(N, C, L)``); ``A = c`` samples, each holding ``C`` planes of
  ``S = prod(spatial)`` values.

Anything else (a slice, a transposed view) is not dense: kernels need a copy first.
"""

from __future__ import annotations

import functools
import math

from torch import Tensor

__all__ = ["Dims", "dims", "dims_of"]

#: ``(G, A, C, S)``
Dims = tuple[int, int, int, int]


# Cached by shape and strides: asked on every layer call.
@functools.lru_cache(maxsize=1024)
def dims_of(shape: tuple[int, ...], stride: tuple[int, ...]) -> Dims | None:
    """``(G, A, C, S)`` when a grouped tensor of this shape and stride has its elements in memory
    as a contiguous tensor of that shape, else ``None``. Rows are tried first: with a single
    spatial position (or channel) both hold, and rows give the longer contiguous runs."""
    if len(shape) < 3:
        return None
    groups, channels = shape[0], shape[2]
    for order in ((0, 1, *range(3, len(shape)), 2), tuple(range(len(shape)))):
        expected = 1
        for d in reversed(order):
            if shape[d] != 1 and stride[d] != expected:
                break
            expected *= shape[d]
        else:
            if order[-1] == 2:  # channels innermost
                return (groups, math.prod(shape) // max(1, groups * channels), channels, 1)
            return (groups, shape[1], channels, math.prod(shape[3:]))
    return None


def dims(xg: Tensor) -> Dims | None:
    """:func:`dims_of` for a tensor."""
    return dims_of(tuple(xg.shape), xg.stride())
