"""The Triton backend: fused kernels for ghost BatchNorm on a grouped view ``(G, c, C, *spatial)``.

Every kernel sees the grouped view as a dense ``(G, A, C, B)`` block: it reduces (or broadcasts)
over ``A`` and ``B`` for each ``(group, channel)``. Two memory layouts map onto that shape without a
copy:

* C innermost (channels_last, channels_last_3d, tabular ``(N, C)``): the ``(c, *spatial)`` positions
  of a group are ``A = c * prod(spatial)`` dense rows of ``C`` channels, and ``B = 1``;
* contiguous (NCHW-like, ``(N, C, L)``): ``A = c`` samples, each holding ``C`` dense planes of
  ``B = prod(spatial)`` values.

Programs work on ``[BA, BCH, BB]`` tiles, so a C-innermost tile is ``BA`` rows of ``BCH`` adjacent
channels and a contiguous tile is ``BCH`` channel planes (``BA`` samples) of ``BB`` adjacent values:
both read memory in long contiguous runs.

* ``stats``: per-lane Welford over each program's share of a group's tiles, lanes merged with
  Chan's formula into per-program ``(count, mean, M2)`` partials, which a second tiny kernel merges
  per ``(group, channel)``. Splitting a group over several programs keeps the GPU busy when there
  are few groups or channels; centring at every step keeps large counts with a large mean exact
  (no ``E[x^2] - E[x]^2`` cancellation).
* ``normalize``: one tile per program, ``y = x * scale + shift`` in float32.
* ``backward_reduce``: per-lane float32 sums of ``dy`` and ``dy * (x - mean)``, split like
  ``stats``; the partials are summed with one torch reduction.
* ``backward_apply``: one tile per program, the BatchNorm input gradient.

Everything accumulates in float32; inputs may be float32, float16 or bfloat16. The kernels run on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (which must be set before triton is
imported). Triton is optional: without it this module still imports and ``supported`` is False.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _math
from . import torch_ops
from ._common import (
    Backend,
    FusedGhostNorm,
    RunningStatsUpdate,
    UpdateHook,
    dense,
    forward_outputs,
    per_channel,
    register_norm_ops,
)
from ._layout import dims_of

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: keep the module importable, supported() is False
    triton = None
    tl = None

__all__ = [
    "COMPILED",
    "EAGER",
    "RunningUpdate",
    "backward_apply",
    "backward_reduce",
    "backward_sums",
    "forward_stats",
    "normalize",
    "stats",
    "supported",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Tuning knobs (tests shrink the tiles to exercise multi-tile and multi-program paths)."""

    # Elements per tile. A reduction program keeps three float32 accumulators per element: 2048
    # elements over 8 warps is 8 per thread, about 64 registers (sm_90), so 4 programs fit per SM.
    reduce_tile: int = 2048
    apply_tile: int = 4096
    reduce_warps: int = 8
    apply_warps: int = 4
    # The widest channel block: C-innermost tiles then still span several rows.
    max_block_channels: int = 128
    # Reductions aim for this many programs per SM, splitting groups to get there...
    programs_per_sm: int = 8
    # ...but give every program at least this many tiles, and never split a group further.
    min_tiles_per_program: int = 4
    max_split: int = 256
    # Elements per tile of the kernels that finish the statistics and the backward sums.
    finish_tile: int = 2048


_CONFIG = _Config()


def _jit(fn: Callable[..., Any]) -> Any:
    return triton.jit(fn) if triton is not None else fn


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@_jit
def _tile(
    a0, ch, b0, A, C, B, BA: tl.constexpr, BCH: tl.constexpr, BB: tl.constexpr
):  # pragma: no cover - traced by triton
    """Offsets in a group's ``(A, C, B)`` block, and the mask, of the tile at ``(a0, ch, b0)``."""
    a = a0 + tl.arange(0, BA)[:, None, None]
    c = ch[None, :, None]
    b = b0 + tl.arange(0, BB)[None, None, :]
    mask = (a < A) & (c < C) & (b < B)
    # int64: a group's block can pass 2**31 elements. The host picks BB == 1 exactly when B == 1;
    # spelling that case out lets the compiler see the unit channel stride and vectorize.
    if BB == 1:
        offs = a.to(tl.int64) * C + c
    else:
        offs = (a.to(tl.int64) * C + c) * B + b
    return offs, mask


@_jit
def _stats_partial_kernel(
    x_ptr,
    part_ptr,
    A,
    C,
    B,
    n_cb,
    n_bt,
    n_tiles,
    tiles_per_split,
    SPLIT,
    BA: tl.constexpr,
    BCH: tl.constexpr,
    BB: tl.constexpr,
):  # pragma: no cover - traced by triton
    pid = tl.program_id(0)
    cb = pid % n_cb
    sp = (pid // n_cb) % SPLIT
    g = pid // (n_cb * SPLIT)
    ch = cb * BCH + tl.arange(0, BCH)
    x_ptr += g.to(tl.int64) * A * C * B
    # Per-lane Welford: every lane sees one value per tile, so the update is elementwise and the
    # only cross-lane reduction happens once, after the loop.
    count = tl.zeros([BA, BCH, BB], tl.float32)
    mean = tl.zeros([BA, BCH, BB], tl.float32)
    m2 = tl.zeros([BA, BCH, BB], tl.float32)
    k0 = sp * tiles_per_split
    k1 = tl.minimum(k0 + tiles_per_split, n_tiles)
    for k in range(k0, k1):
        offs, mask = _tile((k // n_bt) * BA, ch, (k % n_bt) * BB, A, C, B, BA, BCH, BB)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        count += mask.to(tl.float32)
        delta = x - mean
        mean += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    # Chan's merge of the lanes of each channel.
    n = tl.sum(tl.sum(count, axis=2), axis=0)
    n_safe = tl.maximum(n, 1.0)
    merged = tl.sum(tl.sum(count * mean, axis=2), axis=0) / n_safe
    d = mean - merged[None, :, None]
    m2_merged = tl.sum(tl.sum(m2 + count * d * d, axis=2), axis=0)
    # part is (3, G, SPLIT, C): counts, means, M2s.
    out = (g * SPLIT + sp) * C + ch
    cmask = ch < C
    plane = tl.num_programs(0) // n_cb * C  # G * SPLIT * C
    tl.store(part_ptr + out, n, mask=cmask)
    tl.store(part_ptr + plane + out, merged, mask=cmask)
    tl.store(part_ptr + 2 * plane + out, m2_merged, mask=cmask)


@_jit
def _partials_tile(
    g, gmask, s0, ch, cmask, C, SPLIT, BS: tl.constexpr
):  # pragma: no cover - traced by triton
    """Offsets in a ``(G, SPLIT, C)`` plane of partials, and the mask, of the [BG, BS, BCH] tile
    of groups ``g``, partials ``s0..s0+BS`` and channels ``ch``."""
    s = s0 + tl.arange(0, BS)
    mask = gmask[:, None, None] & (s[None, :, None] < SPLIT) & cmask[None, None, :]
    idx = (g[:, None, None] * SPLIT + s[None, :, None]) * C + ch[None, None, :]
    return idx, mask


@_jit
def _merge_partials(
    part_ptr,
    g,
    gmask,
    ch,
    cmask,
    G,
    C,
    SPLIT,
    BG: tl.constexpr,
    BS: tl.constexpr,
    BCH: tl.constexpr,
):  # pragma: no cover - traced by triton
    """Chan's merge of the ``(3, G, SPLIT, C)`` partials of groups ``g`` ([BG]) and channels
    ``ch`` ([BCH]): ``(count, mean, M2)``, each [BG, BCH]."""
    plane = G * SPLIT * C
    n = tl.zeros([BG, BCH], tl.float32)
    mean = tl.zeros([BG, BCH], tl.float32)
    m2 = tl.zeros([BG, BCH], tl.float32)
    for s0 in range(0, SPLIT, BS):
        idx, mask = _partials_tile(g, gmask, s0, ch, cmask, C, SPLIT, BS)
        ns = tl.load(part_ptr + idx, mask=mask, other=0.0)
        ms = tl.load(part_ptr + plane + idx, mask=mask, other=0.0)
        m2s = tl.load(part_ptr + 2 * plane + idx, mask=mask, other=0.0)
        # Merge this chunk of partials around its own mean, then merge that into the running total.
        nb = tl.sum(ns, axis=1)
        mb = tl.sum(ns * ms, axis=1) / tl.maximum(nb, 1.0)
        db = ms - mb[:, None, :]
        m2b = tl.sum(m2s + ns * db * db, axis=1)
        total = n + nb
        w = nb / tl.maximum(total, 1.0)
        delta = mb - mean
        mean += delta * w
        m2 += m2b + delta * delta * n * w
        n = total
    return n, mean, m2


@_jit
def _stats_finish_kernel(
    part_ptr,
    mean_ptr,
    var_ptr,
    rstd_ptr,
    coef_ptr,
    weight_ptr,
    bias_ptr,
    ema_ptr,
    rmean_ptr,
    rvar_ptr,
    nbt_ptr,
    G,
    C,
    SPLIT,
    eps,
    decay,
    bessel,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPDATE: tl.constexpr,
    BG: tl.constexpr,
    BS: tl.constexpr,
    BCH: tl.constexpr,
):  # pragma: no cover - traced by triton
    """From the ``(3, G, SPLIT, C)`` partials, per ``(group, channel)``: mean, biased variance,
    rstd (each ``(G, C)``), and the affine ``scale``/``shift`` that normalize into ``coef``
    ``(2, G, C)``; with ``UPDATE``, also the running statistics' closed-form update
    (``R = decay * R + sum_g ema[g] * s_g``, the variance's with Bessel's factor) and
    ``num_batches_tracked += G``.

    One program per channel block, looping over blocks of groups: the update sums over all of
    them, and a program that owns its channels needs no atomics (the result is deterministic).
    """
    pid = tl.program_id(0)
    ch = pid * BCH + tl.arange(0, BCH)
    cmask = ch < C
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + ch, mask=cmask, other=0.0)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + ch, mask=cmask, other=0.0)[None, :]
    acc_mean = tl.zeros([BCH], tl.float32)
    acc_var = tl.zeros([BCH], tl.float32)
    GC = G * C
    for g0 in range(0, G, BG):
        g = g0 + tl.arange(0, BG)
        gmask = g < G
        n, mean, m2 = _merge_partials(part_ptr, g, gmask, ch, cmask, G, C, SPLIT, BG, BS, BCH)
        var = m2 / tl.maximum(n, 1.0)
        rstd = tl.rsqrt(var + eps)
        if HAS_WEIGHT:
            scale = rstd * w
        else:
            scale = rstd
        if HAS_BIAS:
            shift = b - mean * scale
        else:
            shift = -mean * scale
        out = g[:, None] * C + ch[None, :]
        mask = gmask[:, None] & cmask[None, :]
        tl.store(mean_ptr + out, mean, mask=mask)
        tl.store(var_ptr + out, var, mask=mask)
        tl.store(rstd_ptr + out, rstd, mask=mask)
        tl.store(coef_ptr + out, scale, mask=mask)
        tl.store(coef_ptr + GC + out, shift, mask=mask)
        if UPDATE:
            ema = tl.load(ema_ptr + g, mask=gmask, other=0.0)[:, None]
            acc_mean += tl.sum(ema * mean, axis=0)
            acc_var += tl.sum(ema * var, axis=0)
    if UPDATE:
        rm = tl.load(rmean_ptr + ch, mask=cmask, other=0.0)
        rv = tl.load(rvar_ptr + ch, mask=cmask, other=0.0)
        tl.store(rmean_ptr + ch, rm * decay + acc_mean, mask=cmask)
        tl.store(rvar_ptr + ch, rv * decay + acc_var * bessel, mask=cmask)
        if pid == 0:
            tl.store(nbt_ptr, tl.load(nbt_ptr) + G)


@_jit
def _normalize_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    shift_ptr,
    A,
    C,
    B,
    n_cb,
    n_bt,
    n_tiles,
    BA: tl.constexpr,
    BCH: tl.constexpr,
    BB: tl.constexpr,
):  # pragma: no cover - traced by triton
    pid = tl.program_id(0)
    # Channel blocks vary fastest: neighbouring programs touch neighbouring memory.
    cb = pid % n_cb
    k = (pid // n_cb) % n_tiles
    g = pid // (n_cb * n_tiles)
    ch = cb * BCH + tl.arange(0, BCH)
    cmask = ch < C
    scale = tl.load(scale_ptr + g * C + ch, mask=cmask, other=0.0)[None, :, None]
    shift = tl.load(shift_ptr + g * C + ch, mask=cmask, other=0.0)[None, :, None]
    base = g.to(tl.int64) * A * C * B
    offs, mask = _tile((k // n_bt) * BA, ch, (k % n_bt) * BB, A, C, B, BA, BCH, BB)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * scale + shift
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _backward_reduce_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    part_ptr,
    G,
    A,
    C,
    B,
    n_cb,
    n_bt,
    n_tiles,
    tiles_per_split,
    SPLIT,
    BA: tl.constexpr,
    BCH: tl.constexpr,
    BB: tl.constexpr,
):  # pragma: no cover - traced by triton
    pid = tl.program_id(0)
    cb = pid % n_cb
    sp = (pid // n_cb) % SPLIT
    g = pid // (n_cb * SPLIT)
    ch = cb * BCH + tl.arange(0, BCH)
    cmask = ch < C
    mean = tl.load(mean_ptr + g * C + ch, mask=cmask, other=0.0)[None, :, None]
    base = g.to(tl.int64) * A * C * B
    # Per-lane sums; centring at the known mean keeps dy * (x - mean) free of cancellation.
    acc_dy = tl.zeros([BA, BCH, BB], tl.float32)
    acc_dyx = tl.zeros([BA, BCH, BB], tl.float32)
    k0 = sp * tiles_per_split
    k1 = tl.minimum(k0 + tiles_per_split, n_tiles)
    for k in range(k0, k1):
        offs, mask = _tile((k // n_bt) * BA, ch, (k % n_bt) * BB, A, C, B, BA, BCH, BB)
        dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        acc_dy += dy
        acc_dyx += dy * (x - mean)  # masked lanes: dy == 0
    rstd = tl.load(rstd_ptr + g * C + ch, mask=cmask, other=0.0)
    sum_dy = tl.sum(tl.sum(acc_dy, axis=2), axis=0)
    sum_dyx = tl.sum(tl.sum(acc_dyx, axis=2), axis=0) * rstd
    # part is (2, G, SPLIT, C).
    out = (g * SPLIT + sp) * C + ch
    tl.store(part_ptr + out, sum_dy, mask=cmask)
    tl.store(part_ptr + G * SPLIT * C + out, sum_dyx, mask=cmask)


@_jit
def _backward_finish_kernel(
    part_ptr,
    sums_ptr,
    dbias_ptr,
    dweight_ptr,
    G,
    C,
    SPLIT,
    BG: tl.constexpr,
    BS: tl.constexpr,
    BCH: tl.constexpr,
):  # pragma: no cover - traced by triton
    """From the ``(2, G, SPLIT, C)`` partials: ``sum dy`` and ``sum dy * xhat`` per ``(group,
    channel)``, into ``sums`` ``(2, G, C)``, and their totals over the groups: the bias and
    weight gradients, ``(C,)`` each. One program per channel block, as in
    ``_stats_finish_kernel``."""
    pid = tl.program_id(0)
    ch = pid * BCH + tl.arange(0, BCH)
    cmask = ch < C
    tot_dy = tl.zeros([BCH], tl.float32)
    tot_dyx = tl.zeros([BCH], tl.float32)
    GC = G * C
    for g0 in range(0, G, BG):
        g = g0 + tl.arange(0, BG)
        gmask = g < G
        s_dy = tl.zeros([BG, BCH], tl.float32)
        s_dyx = tl.zeros([BG, BCH], tl.float32)
        for s0 in range(0, SPLIT, BS):
            idx, mask = _partials_tile(g, gmask, s0, ch, cmask, C, SPLIT, BS)
            s_dy += tl.sum(tl.load(part_ptr + idx, mask=mask, other=0.0), axis=1)
            s_dyx += tl.sum(tl.load(part_ptr + GC * SPLIT + idx, mask=mask, other=0.0), axis=1)
        out = g[:, None] * C + ch[None, :]
        mask = gmask[:, None] & cmask[None, :]
        tl.store(sums_ptr + out, s_dy, mask=mask)
        tl.store(sums_ptr + GC + out, s_dyx, mask=mask)
        tot_dy += tl.sum(s_dy, axis=0)
        tot_dyx += tl.sum(s_dyx, axis=0)
    tl.store(dbias_ptr + ch, tot_dy, mask=cmask)
    tl.store(dweight_ptr + ch, tot_dyx, mask=cmask)


@_jit
def _backward_apply_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    sum_dy_ptr,
    sum_dyx_ptr,
    inv_count,
    A,
    C,
    B,
    n_cb,
    n_bt,
    n_tiles,
    HAS_WEIGHT: tl.constexpr,
    BA: tl.constexpr,
    BCH: tl.constexpr,
    BB: tl.constexpr,
):  # pragma: no cover - traced by triton
    pid = tl.program_id(0)
    cb = pid % n_cb
    k = (pid // n_cb) % n_tiles
    g = pid // (n_cb * n_tiles)
    ch = cb * BCH + tl.arange(0, BCH)
    cmask = ch < C
    gc = g * C + ch
    mean = tl.load(mean_ptr + gc, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + gc, mask=cmask, other=0.0)
    # dx = a * (dy - b - (x - mean) * c): per-channel coefficients, computed once per tile.
    a = rstd
    if HAS_WEIGHT:
        a = a * tl.load(weight_ptr + ch, mask=cmask, other=0.0)
    b = tl.load(sum_dy_ptr + gc, mask=cmask, other=0.0) * inv_count
    c = tl.load(sum_dyx_ptr + gc, mask=cmask, other=0.0) * (rstd * inv_count)
    base = g.to(tl.int64) * A * C * B
    offs, mask = _tile((k // n_bt) * BA, ch, (k % n_bt) * BB, A, C, B, BA, BCH, BB)
    dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    dx = a[None, :, None] * (dy - b[None, :, None] - (x - mean[None, :, None]) * c[None, :, None])
    tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs its interpreter on the CPU (``TRITON_INTERPRET=1``). Read once: the
    variable only takes effect when set before triton is imported, which this module does."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _sm_count(device_index: int) -> int:
    if device_index >= 0:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4  # the interpreter: any small number


def _geometry(xg: Tensor) -> tuple[int, int] | None:
    """``(A, B)`` of the dense ``(G, A, C, B)`` block ``xg`` is, or None for other layouts."""
    return _geometry_of(tuple(xg.shape), xg.stride())


def _geometry_of(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int] | None:
    d = dims_of(shape, stride) if 3 <= len(shape) <= 6 else None
    return None if d is None else (d[1], d[3])


def supported(xg: Tensor) -> bool:
    """Whether the kernels here handle the grouped view ``xg`` (dtype, layout, device)."""
    if not xg.is_cuda and not (xg.is_cpu and interpreting()):
        return False
    if triton is None or xg.dtype not in _DTYPES or not 3 <= xg.dim() <= 6 or xg.numel() == 0:
        return False
    return _geometry(xg) is not None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a ``(G, A, C, B)`` block is cut into ``[BA, BCH, BB]`` tiles, with the kernels'
    integer arguments ``(A, C, B, n_cb, n_bt, n_tiles)``."""

    G: int
    A: int
    C: int
    B: int
    BA: int
    BCH: int
    BB: int

    @property
    def n_cb(self) -> int:
        return _cdiv(self.C, self.BCH)

    @property
    def n_bt(self) -> int:
        return _cdiv(self.B, self.BB)

    @property
    def n_tiles(self) -> int:
        """Tiles per (group, channel block)."""
        return _cdiv(self.A, self.BA) * self.n_bt

    def args(self) -> tuple[int, ...]:
        return (self.A, self.C, self.B, self.n_cb, self.n_bt, self.n_tiles)

    def blocks(self) -> tuple[tuple[str, int], ...]:
        """The tile sizes as the kernels' last constexpr arguments, in their order."""
        return (("BA", self.BA), ("BCH", self.BCH), ("BB", self.BB))


def _tiling(A: int, B: int, G: int, C: int, tile: int, config: _Config) -> _Plan:
    if B == 1:
        BB = 1
    elif B <= 512:
        BB = _pow2(B)
    else:
        # Long planes: the run length that pads the plane least (ties go to the longer run).
        BB = min((128, 256, 512), key=lambda bb: (_cdiv(B, bb) * bb, -bb))
    BB = min(BB, tile)
    BCH = min(_pow2(C), max(1, tile // BB), config.max_block_channels)
    BA = min(_pow2(A), max(1, tile // (BB * BCH)))
    return _Plan(G, A, C, B, BA, BCH, BB)


@dataclasses.dataclass(frozen=True)
class _Launch:
    """Everything the host functions pass to the kernels for one shape and layout: computed
    once per (shape, strides, device), since a layer sees the same ones step after step and in
    eager mode on a GPU every microsecond of Python per launch counts."""

    G: int
    C: int
    # Reductions (stats, backward_reduce): a grid of (G, split, channel blocks) programs.
    reduce_grid: tuple[int]
    reduce_args: tuple[int, ...]  # plan.args() + (tiles_per_split, split)
    reduce_blocks: tuple[tuple[str, int], ...]
    split: int
    # Elementwise passes (normalize, backward_apply): one tile per program.
    apply_grid: tuple[int]
    apply_args: tuple[int, ...]
    apply_blocks: tuple[tuple[str, int], ...]
    # The finishing kernels: one program per channel block.
    finish_grid: tuple[int]
    finish_blocks: tuple[tuple[str, int], ...]
    device_index: int
    # Compiled kernels for this shape, launched without Triton's dispatch (see _run).
    runners: dict[tuple[Any, ...], Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False
    )


def _launch(xg: Tensor) -> _Launch:
    return _launch_for(xg.shape, xg.stride(), xg.dtype, xg.get_device(), _CONFIG)


@functools.lru_cache(maxsize=1024)
def _launch_for(
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    dtype: torch.dtype,
    device_index: int,  # -1: the CPU
    config: _Config,
) -> _Launch:
    # supported()'s checks, once per key (a failed check raises, and is not cached).
    geometry = _geometry_of(shape, stride) if 3 <= len(shape) <= 6 else None
    if (
        triton is None
        or (device_index < 0 and not interpreting())
        or dtype not in _DTYPES
        or math.prod(shape) == 0
        or geometry is None
    ):
        raise ValueError(
            f"fxghost triton backend: unsupported grouped view: shape {tuple(shape)}, "
            f"strides {stride}, dtype {dtype}, {'CPU' if device_index < 0 else 'CUDA'} device"
        )
    A, B = geometry
    G, C = shape[0], shape[2]
    red = _tiling(A, B, G, C, config.reduce_tile, config)
    # How many programs share a (group, channel block): enough to fill the GPU...
    wanted = config.programs_per_sm * _sm_count(device_index)
    split = min(
        _cdiv(wanted, G * red.n_cb),
        _cdiv(red.n_tiles, config.min_tiles_per_program),  # ...with a few tiles each
        config.max_split,
    )
    tiles_per_split = _cdiv(red.n_tiles, max(1, split))
    split = _cdiv(red.n_tiles, tiles_per_split)  # recounted: no program is left without tiles
    app = _tiling(A, B, G, C, config.apply_tile, config)
    # Finishing tiles [BG, BS, BCH] (groups, partials, channels) of at most finish_tile values.
    f_bch = min(_pow2(C), 64, config.finish_tile)
    f_bs = min(_pow2(split), 16, max(1, config.finish_tile // f_bch))
    f_bg = min(_pow2(G), max(1, config.finish_tile // (f_bs * f_bch)))
    return _Launch(
        G=G,
        C=C,
        reduce_grid=(G * red.n_cb * split,),
        reduce_args=(*red.args(), tiles_per_split, split),
        reduce_blocks=red.blocks(),
        split=split,
        apply_grid=(G * app.n_cb * app.n_tiles,),
        apply_args=app.args(),
        apply_blocks=app.blocks(),
        finish_grid=(_cdiv(C, f_bch),),
        finish_blocks=(("BG", f_bg), ("BS", f_bs), ("BCH", f_bch)),
        device_index=device_index,
    )


def _direct_launch_supported() -> bool:
    """Whether :func:`_run` may launch compiled kernels itself: on CUDA (not the interpreter),
    with a Triton whose compiled kernels take every parameter, constexprs included, in signature
    order (checked in 3.6 and 3.8)."""
    if triton is None or interpreting():
        return False
    try:
        version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return version >= (3, 5)


_DIRECT = _direct_launch_supported()


def _run(
    lp: _Launch,
    kernel: Any,
    grid: tuple[int, ...],
    stream: int,
    args: tuple[Any, ...],
    consts: tuple[tuple[str, Any], ...],
    num_warps: int,
) -> None:
    """``kernel[grid](*args, **dict(consts), num_warps=num_warps)``, on ``stream``.

    Triton's dispatch binds and specializes every argument and hashes a cache key on each call:
    tens of microseconds of CPU per launch, six launches per layer step, which small layers in
    eager mode do not hide behind their kernels. The first call here goes through that dispatch
    and keeps the compiled kernel it returns; later calls with the same specialization launch it
    directly. What Triton specializes on is fixed by ``lp`` (shape, strides, dtype: the integer
    arguments, by value) and by ``consts``, except for the tensors' dtypes and their pointers'
    16-byte alignment, which make the rest of the key; an unaligned tensor takes Triton's
    dispatch. The tensors come first in ``args`` (the kernels' ``*_ptr`` parameters, which the
    key loop reads), and ``consts`` follow ``args`` in the kernel's signature, in its order: a
    tensor after the pointers, or constexprs out of order, are found at the compile, and such a
    call always takes the dispatch.
    """
    if _DIRECT:
        pointers = _pointer_count(kernel)
        key: list[Any] = [kernel, grid, consts, num_warps]
        for t in args[:pointers]:
            if t.data_ptr() % 16:
                break
            key.append(t.dtype)
        else:
            k = tuple(key)
            entry = lp.runners.get(k)
            if entry is not None:
                entry[0](*args, *entry[1], stream=stream)
                return
            compiled = kernel[grid](*args, **dict(consts), num_warps=num_warps)
            if (
                tuple(kernel.arg_names[len(args) :]) == tuple(n for n, _ in consts)
                and not any(isinstance(a, Tensor) for a in args[pointers:])
                and hasattr(compiled, "__getitem__")
            ):
                # A compiled kernel's launcher reads all three grid dimensions.
                runner = compiled[(*grid, 1, 1)[:3]]
                lp.runners[k] = (runner, tuple(v for _, v in consts))
            return
    kernel[grid](*args, **dict(consts), num_warps=num_warps)


@functools.cache
def _pointer_count(kernel: Any) -> int:
    """How many of ``kernel``'s parameters, from the first, are pointers (named ``*_ptr``, as
    all of this module's are, ahead of the scalars)."""
    n = 0
    for name in kernel.arg_names:
        if not name.endswith("_ptr"):
            break
        n += 1
    return n


def _stream(lp: _Launch) -> int:
    """The current CUDA stream of the launch's device, as Triton launches on it."""
    return torch._C._cuda_getCurrentRawStream(lp.device_index) if lp.device_index >= 0 else 0


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    # Triton launches on the current CUDA device; make that the tensor's (entering
    # torch.cuda.device costs microseconds per call: skipped when it is already current).
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def _f32(t: Tensor) -> Tensor:
    """``t`` as dense float32: itself when it is, without a dispatch. The kernels address
    per-(group, channel) operands by flat index, so any shape with ``G * C`` values will do."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.to(torch.float32).contiguous()


def _like(xg: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised tensor with ``xg``'s shape and strides."""
    out = torch.empty_like(xg, dtype=dtype)
    if out.stride() != xg.stride():  # empty_like keeps dense layouts, this is only a safeguard
        out = torch.empty_strided(xg.shape, xg.stride(), dtype=out.dtype, device=xg.device)
    return out


def _matching(dy: Tensor, xg: Tensor) -> Tensor:
    """``dy`` laid out like ``xg`` (the kernels address both with the same offsets)."""
    if dy.shape != xg.shape:
        raise ValueError(f"fxghost triton backend: dy shape {tuple(dy.shape)} != {tuple(xg.shape)}")
    if dy.stride() == xg.stride() and dy.device == xg.device:
        return dy
    if dy.device == xg.device and _geometry(dy) == _geometry(xg):
        return dy
    return _like(xg, dy.dtype).copy_(dy)


class RunningUpdate(NamedTuple):
    """What :func:`forward_stats` needs to update BatchNorm's running statistics in place as
    :func:`fxghost._math.update_running_stats` does (float32 buffers on the input's device):
    ``R = decay * R + sum_g weights[g] * s_g``, the variance's times ``bessel``, and
    ``num_batches_tracked += G``."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor
    weights: Tensor  # (G,) float32
    decay: float
    bessel: float


def forward_stats(
    xg: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    update: RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(mean, var, rstd, scale, shift)`` per ``(group, channel)`` of ``xg``, float32 ``(G, C)``:
    biased variance, ``rstd = 1 / sqrt(var + eps)``, and ``y = x * scale + shift`` normalizes
    (with ``weight`` and ``bias`` when given). With ``update``, the running statistics are
    updated in the same launch. Two kernel launches in all."""
    lp = _launch(xg)
    G, C = lp.G, lp.C
    device = xg.device
    partials = torch.empty((3, G, lp.split, C), dtype=torch.float32, device=device)
    # Separate tensors, not views of one: they leave as separate outputs of a custom op.
    mean = torch.empty((G, C), dtype=torch.float32, device=device)
    var = torch.empty((G, C), dtype=torch.float32, device=device)
    rstd = torch.empty((G, C), dtype=torch.float32, device=device)
    coef = torch.empty((2, G, C), dtype=torch.float32, device=device)
    # A missing parameter's pointer is never read: any float32 tensor will do.
    w = _f32(weight) if weight is not None else mean
    b = _f32(bias) if bias is not None else mean
    if update is not None:
        if update.weights.numel() != G:
            raise ValueError(
                f"fxghost triton backend: {update.weights.numel()} EMA weights, {G} groups"
            )
        ema, rmean, rvar = update.weights, update.running_mean, update.running_var
        nbt, decay, bessel = update.num_batches_tracked, update.decay, update.bessel
    else:
        ema = rmean = rvar = nbt = mean  # not read
        decay = bessel = 1.0
    with _device_guard(xg):
        stream = _stream(lp)
        _run(
            lp,
            _stats_partial_kernel,
            lp.reduce_grid,
            stream,
            (xg, partials, *lp.reduce_args),
            lp.reduce_blocks,
            _CONFIG.reduce_warps,
        )
        _run(
            lp,
            _stats_finish_kernel,
            lp.finish_grid,
            stream,
            (
                partials,
                mean,
                var,
                rstd,
                coef,
                w,
                b,
                ema,
                rmean,
                rvar,
                nbt,
                G,
                C,
                lp.split,
                eps,
                decay,
                bessel,
            ),
            (
                ("HAS_WEIGHT", weight is not None),
                ("HAS_BIAS", bias is not None),
                ("UPDATE", update is not None),
                *lp.finish_blocks,
            ),
            4,
        )
    return mean, var, rstd, coef[0], coef[1]


def stats(xg: Tensor) -> tuple[Tensor, Tensor]:
    """Per ``(group, channel)`` mean and biased variance of ``xg``, float32, shape ``(G, C)``."""
    # eps only enters rstd, scale and shift, which are dropped here.
    mean, var, *_ = forward_stats(xg, None, None, 1.0)
    return mean, var


def normalize(xg: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """``xg * scale[g, ch] + shift[g, ch]`` in float32, in ``xg``'s dtype and layout: into ``out``
    (laid out as ``xg``) when given. ``scale`` and ``shift`` hold ``G * C`` values."""
    lp = _launch(xg)
    y = _like(xg) if out is None else out
    if y.shape != xg.shape or y.stride() != xg.stride():
        raise ValueError("fxghost: normalize needs an output laid out as its input")
    with _device_guard(xg):
        _run(
            lp,
            _normalize_kernel,
            lp.apply_grid,
            _stream(lp),
            (xg, y, _f32(scale), _f32(shift), *lp.apply_args),
            lp.apply_blocks,
            _CONFIG.apply_warps,
        )
    return y


def backward_sums(
    dy: Tensor, xg: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum dy, sum dy * xhat)`` per ``(group, channel)``, float32 ``(G, C)``, and their sums
    over the groups, float32 ``(C,)``: the bias and weight gradients. Two kernel launches.

    ``xhat = (xg - mean) * rstd``; ``mean`` and ``rstd`` hold ``G * C`` values.
    """
    lp = _launch(xg)
    G, C = lp.G, lp.C
    dy = _matching(dy, xg)
    partials = torch.empty((2, G, lp.split, C), dtype=torch.float32, device=xg.device)
    sums = torch.empty((2, G, C), dtype=torch.float32, device=xg.device)
    # Separate tensors, not views of one: they leave as separate outputs of a custom op.
    dbias = torch.empty(C, dtype=torch.float32, device=xg.device)
    dweight = torch.empty(C, dtype=torch.float32, device=xg.device)
    with _device_guard(xg):
        stream = _stream(lp)
        _run(
            lp,
            _backward_reduce_kernel,
            lp.reduce_grid,
            stream,
            (dy, xg, _f32(mean), _f32(rstd), partials, G, *lp.reduce_args),
            lp.reduce_blocks,
            _CONFIG.reduce_warps,
        )
        _run(
            lp,
            _backward_finish_kernel,
            lp.finish_grid,
            stream,
            (partials, sums, dbias, dweight, G, C, lp.split),
            lp.finish_blocks,
            4,
        )
    return sums[0], sums[1], dbias, dweight


def backward_reduce(dy: Tensor, xg: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * xhat)`` per ``(group, channel)``, float32 ``(G, C)``."""
    sum_dy, sum_dy_xhat, _, _ = backward_sums(dy, xg, mean, rstd)
    return sum_dy, sum_dy_xhat


def backward_apply(
    dy: Tensor,
    xg: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
) -> Tensor:
    """The BatchNorm input gradient, in ``xg``'s dtype and layout.

    ``dx = weight * rstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)`` with
    ``xhat = (xg - mean) * rstd``; ``count`` is the number of values per (group, channel).
    """
    lp = _launch(xg)
    dy = _matching(dy, xg)
    mean = _f32(mean)
    w = mean if weight is None else _f32(weight)
    dx = _like(xg)
    with _device_guard(xg):
        _run(
            lp,
            _backward_apply_kernel,
            lp.apply_grid,
            _stream(lp),
            # w is never read without a weight: any float32 pointer will do
            (
                dy,
                xg,
                dx,
                mean,
                _f32(rstd),
                w,
                _f32(sum_dy),
                _f32(sum_dy_xhat),
                1.0 / count,
                *lp.apply_args,
            ),
            (("HAS_WEIGHT", weight is not None), *lp.apply_blocks),
            _CONFIG.apply_warps,
        )
    return dx


class _TritonGhostNorm(FusedGhostNorm):
    """Ghost normalization in fused Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``):
    forward reads x twice and writes y once; backward reads x and dy twice and writes dx once.
    Three launches each way (statistics, their finish, the elementwise pass), the running
    statistics' update included when ``update`` is given: in eager mode on a GPU each launch and
    each small torch op costs CPU time that a layer's kernels do not hide."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        xg: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        update: RunningUpdate | UpdateHook | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``update``: made by the kernels (a :class:`RunningUpdate`), or a hook called with
        the statistics; either way before anything is saved for backward."""
        fused = update if isinstance(update, RunningUpdate) else None
        y, mean, var, rstd = _triton_forward(xg, weight, bias, eps, fused)
        count = xg.numel() // (xg.shape[0] * xg.shape[2])
        hook = None if isinstance(update, RunningUpdate) else update
        mean_s, var_s = forward_outputs(
            ctx, xg, weight, bias, eps, (mean, rstd, var), _triton_backward, count, hook
        )
        return y, mean_s, var_s


def _triton_forward(
    xg: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    update: RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` from the kernels: ``y`` sample-first, laid out as ``xg``."""
    mean, var, rstd, scale, shift = forward_stats(xg, weight, bias, eps, update)
    y = torch.empty_like(xg.flatten(0, 1))
    normalize(xg, scale, shift, out=y.view(xg.shape))
    return y, mean, var, rstd


def _triton_backward(
    dy: Tensor,
    xg: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    input_grad: bool,
    count: int,
) -> tuple[Tensor | None, Tensor, Tensor]:
    sum_dy, sum_dy_xhat, dbias, dweight = backward_sums(dy, xg, mean, rstd)
    grad_x = (
        backward_apply(dy, xg, mean, rstd, weight, sum_dy, sum_dy_xhat, count)
        if input_grad
        else None
    )
    return grad_x, dweight, dbias


# The kernels as custom ops, for torch.compile with backend="triton" (by default inductor gets
# the torch backend's decomposition, which it fuses with neighbouring ops). On the CPU they run
# only under the Triton interpreter.
def _triton_dense(xg: Tensor) -> Tensor:
    # Compiled code may hand over a layout its trace did not see: the kernels take dense ones.
    return xg if supported(xg) else xg.contiguous()


def _triton_op_forward(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = _triton_dense(xg)
    y, mean, var, rstd = _triton_forward(x, weight, bias, eps)
    if x is not xg:  # back to the layout the fake implementation promised
        y = torch.empty_like(xg.flatten(0, 1)).copy_(y)
    return y, mean, var, rstd


def _triton_op_backward(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    x = _triton_dense(xg)
    count = xg.numel() // (xg.shape[0] * xg.shape[2])
    grad_x, dweight, dbias = _triton_backward(dy, x, weight, mean, rstd, True, count)
    if x is not xg:  # back to the layout the fake implementation promised
        grad_x = torch.empty_like(xg).copy_(grad_x)  # type: ignore[arg-type]
    return grad_x, dweight, dbias  # type: ignore[return-value]


_custom_op_norm = register_norm_ops(
    "triton_ghost_norm", ("cuda", "cpu"), _triton_op_forward, _triton_op_backward
)


class _Eager(Backend):
    name = "triton"
    label = "triton"

    def norm(
        self,
        xg: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        update: RunningStatsUpdate | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        xg = dense(xg)
        fused = None if update is None else _fused_update(xg, update)
        hook = fused if fused is not None else self.update_hook(update, xg)
        return _TritonGhostNorm.apply(xg, weight, bias, eps, hook)  # type: ignore[no-any-return]


def _fused_update(xg: Tensor, update: RunningStatsUpdate) -> RunningUpdate | None:
    """``update`` made in the launch that finishes the statistics, where the kernel can (an
    exponential average of float32 buffers on the input's device): on a GPU in eager mode the
    small torch ops of the update cost more CPU time than the kernels' GPU time."""
    running_mean, running_var = update.running_mean, update.running_var
    nbt = update.num_batches_tracked
    if (
        update.momentum is None
        or nbt is None
        or running_mean.dtype != torch.float32
        or running_var.dtype != torch.float32
        or running_mean.device != xg.device
        or not (running_mean.is_contiguous() and running_var.is_contiguous())
        or _geometry(xg) is None
    ):
        return None
    weights, decay = _math.ema_coefficients(
        update.momentum, update.requested, xg.shape[0], torch.float32, xg.device
    )
    return RunningUpdate(
        running_mean, running_var, nbt, weights, decay, _math.bessel(per_channel(xg))
    )


EAGER: Backend = _Eager()
COMPILED: Backend = torch_ops.CustomOpCompiled(
    "triton", "triton (custom op, compiled)", _custom_op_norm
)
