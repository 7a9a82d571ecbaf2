"""Fused Triton kernels for ghost BatchNorm on a grouped view ``(G, c, C, *spatial)``.

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
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: keep the module importable, supported() is False
    triton = None
    tl = None

__all__ = ["backward_apply", "backward_reduce", "normalize", "stats", "supported"]

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
    pcount_ptr,
    pmean_ptr,
    pm2_ptr,
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
    out = (g * SPLIT + sp) * C + ch
    cmask = ch < C
    tl.store(pcount_ptr + out, n, mask=cmask)
    tl.store(pmean_ptr + out, merged, mask=cmask)
    tl.store(pm2_ptr + out, m2_merged, mask=cmask)


@_jit
def _stats_combine_kernel(
    pcount_ptr,
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    var_ptr,
    C,
    SPLIT,
    BS: tl.constexpr,
    BCH: tl.constexpr,
):  # pragma: no cover - traced by triton
    """Merge the ``(G, SPLIT, C)`` partials into ``(G, C)`` mean and biased variance."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BCH)
    g = pid // n_cb
    ch = (pid % n_cb) * BCH + tl.arange(0, BCH)
    cmask = ch < C
    n = tl.zeros([BCH], tl.float32)
    mean = tl.zeros([BCH], tl.float32)
    m2 = tl.zeros([BCH], tl.float32)
    for s0 in range(0, SPLIT, BS):
        s = s0 + tl.arange(0, BS)
        mask = (s[:, None] < SPLIT) & cmask[None, :]
        idx = (g * SPLIT + s[:, None]) * C + ch[None, :]
        ns = tl.load(pcount_ptr + idx, mask=mask, other=0.0)
        ms = tl.load(pmean_ptr + idx, mask=mask, other=0.0)
        m2s = tl.load(pm2_ptr + idx, mask=mask, other=0.0)
        # Merge this chunk of partials around its own mean, then merge that into the running total.
        nb = tl.sum(ns, axis=0)
        mb = tl.sum(ns * ms, axis=0) / tl.maximum(nb, 1.0)
        db = ms - mb[None, :]
        m2b = tl.sum(m2s + ns * db * db, axis=0)
        total = n + nb
        w = nb / tl.maximum(total, 1.0)
        delta = mb - mean
        mean += delta * w
        m2 += m2b + delta * delta * n * w
        n = total
    out = g * C + ch
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(var_ptr + out, m2 / tl.maximum(n, 1.0), mask=cmask)


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


def interpreting() -> bool:
    """Whether Triton runs its interpreter on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number


def _geometry(xg: Tensor) -> tuple[int, int] | None:
    """``(A, B)`` of the dense ``(G, A, C, B)`` block ``xg`` is, or None for other layouts."""
    if xg.dim() < 3:
        return None
    c = xg.shape[1]
    inner = math.prod(xg.shape[3:])
    # Checked first: with a single spatial position (or channel) both layouts hold, and rows of
    # channels give the wider contiguous tiles.
    if xg.movedim(2, -1).is_contiguous():
        return c * inner, 1
    if xg.is_contiguous():
        return c, inner
    return None


def supported(xg: Tensor) -> bool:
    """Whether the kernels here handle the grouped view ``xg`` (dtype, layout, device)."""
    if xg.device.type != "cuda" and not (xg.device.type == "cpu" and interpreting()):
        return False
    if triton is None or xg.dtype not in _DTYPES or not 3 <= xg.dim() <= 6 or xg.numel() == 0:
        return False
    return _geometry(xg) is not None


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a ``(G, A, C, B)`` block is cut into ``[BA, BCH, BB]`` tiles."""

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

    def blocks(self) -> dict[str, int]:
        return {"BA": self.BA, "BCH": self.BCH, "BB": self.BB}


def _plan(xg: Tensor, tile: int) -> _Plan:
    geometry = _geometry(xg)
    if not supported(xg) or geometry is None:
        raise ValueError(
            f"fxghost._triton: unsupported grouped view: shape {tuple(xg.shape)}, "
            f"strides {xg.stride()}, dtype {xg.dtype}, device {xg.device}"
        )
    A, B = geometry
    G, C = xg.shape[0], xg.shape[2]
    if B == 1:
        BB = 1
    elif B <= 512:
        BB = _pow2(B)
    else:
        # Long planes: the run length that pads the plane least (ties go to the longer run).
        BB = min((128, 256, 512), key=lambda bb: (_cdiv(B, bb) * bb, -bb))
    BB = min(BB, tile)
    BCH = min(_pow2(C), max(1, tile // BB), _CONFIG.max_block_channels)
    BA = min(_pow2(A), max(1, tile // (BB * BCH)))
    return _Plan(G, A, C, B, BA, BCH, BB)


def _split(plan: _Plan, device: torch.device) -> tuple[int, int]:
    """``(split, tiles_per_split)``: how many programs share a (group, channel block)."""
    wanted = _CONFIG.programs_per_sm * _sm_count(device)
    split = min(
        _cdiv(wanted, plan.G * plan.n_cb),
        _cdiv(plan.n_tiles, _CONFIG.min_tiles_per_program),
        _CONFIG.max_split,
    )
    tiles_per_split = _cdiv(plan.n_tiles, max(1, split))
    # Recount so that no program is left without tiles.
    return _cdiv(plan.n_tiles, tiles_per_split), tiles_per_split


def _device_guard(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    # Triton launches on the current CUDA device; make that the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _per_group(t: Tensor, G: int, C: int) -> Tensor:
    return t.reshape(G, C).to(torch.float32).contiguous()


def _like(xg: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised tensor with ``xg``'s shape and strides."""
    out = torch.empty_like(xg, dtype=dtype)
    if out.stride() != xg.stride():  # empty_like keeps dense layouts, this is only a safeguard
        out = torch.empty_strided(xg.shape, xg.stride(), dtype=out.dtype, device=xg.device)
    return out


def _matching(dy: Tensor, xg: Tensor) -> Tensor:
    """``dy`` laid out like ``xg`` (the kernels address both with the same offsets)."""
    if dy.shape != xg.shape:
        raise ValueError(f"fxghost._triton: dy shape {tuple(dy.shape)} != {tuple(xg.shape)}")
    if dy.device == xg.device and _geometry(dy) == _geometry(xg):
        return dy
    return _like(xg, dy.dtype).copy_(dy)


def stats(xg: Tensor) -> tuple[Tensor, Tensor]:
    """Per ``(group, channel)`` mean and biased variance of ``xg``, float32, shape ``(G, C)``."""
    plan = _plan(xg, _CONFIG.reduce_tile)
    split, tiles_per_split = _split(plan, xg.device)
    G, C = plan.G, plan.C
    partials = torch.empty((3, G, split, C), dtype=torch.float32, device=xg.device)
    mean = torch.empty((G, C), dtype=torch.float32, device=xg.device)
    var = torch.empty_like(mean)
    combine_bch = min(_pow2(C), 128)
    with _device_guard(xg):
        _stats_partial_kernel[(G * plan.n_cb * split,)](
            xg,
            partials[0],
            partials[1],
            partials[2],
            *plan.args(),
            tiles_per_split,
            split,
            **plan.blocks(),
            num_warps=_CONFIG.reduce_warps,
        )
        _stats_combine_kernel[(G * _cdiv(C, combine_bch),)](
            partials[0],
            partials[1],
            partials[2],
            mean,
            var,
            C,
            split,
            BS=min(_pow2(split), 32),
            BCH=combine_bch,
            num_warps=4,
        )
    return mean, var


def normalize(xg: Tensor, scale: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """``xg * scale[g, ch] + shift[g, ch]`` in float32, in ``xg``'s dtype and layout: into ``out``
    (laid out as ``xg``) when given."""
    plan = _plan(xg, _CONFIG.apply_tile)
    G, C = plan.G, plan.C
    y = _like(xg) if out is None else out
    if y.shape != xg.shape or y.stride() != xg.stride():
        raise ValueError("fxghost: normalize needs an output laid out as its input")
    with _device_guard(xg):
        _normalize_kernel[(G * plan.n_cb * plan.n_tiles,)](
            xg,
            y,
            _per_group(scale, G, C),
            _per_group(shift, G, C),
            *plan.args(),
            **plan.blocks(),
            num_warps=_CONFIG.apply_warps,
        )
    return y


def backward_reduce(dy: Tensor, xg: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy, sum dy * xhat)`` per ``(group, channel)``, float32 ``(G, C)``.

    ``xhat = (xg - mean) * rstd``; ``mean`` and ``rstd`` are float32 with ``G * C`` elements.
    """
    plan = _plan(xg, _CONFIG.reduce_tile)
    split, tiles_per_split = _split(plan, xg.device)
    G, C = plan.G, plan.C
    dy = _matching(dy, xg)
    partials = torch.empty((2, G, split, C), dtype=torch.float32, device=xg.device)
    with _device_guard(xg):
        _backward_reduce_kernel[(G * plan.n_cb * split,)](
            dy,
            xg,
            _per_group(mean, G, C),
            _per_group(rstd, G, C),
            partials,
            G,
            *plan.args(),
            tiles_per_split,
            split,
            **plan.blocks(),
            num_warps=_CONFIG.reduce_warps,
        )
    sums = partials[:, :, 0] if split == 1 else partials.sum(dim=2)
    return sums[0], sums[1]


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
    plan = _plan(xg, _CONFIG.apply_tile)
    G, C = plan.G, plan.C
    dy = _matching(dy, xg)
    mean = _per_group(mean, G, C)
    w = mean if weight is None else weight.reshape(C).to(torch.float32).contiguous()
    dx = _like(xg)
    with _device_guard(xg):
        _backward_apply_kernel[(G * plan.n_cb * plan.n_tiles,)](
            dy,
            xg,
            dx,
            mean,
            _per_group(rstd, G, C),
            w,  # never read without a weight; any float32 pointer will do
            _per_group(sum_dy, G, C),
            _per_group(sum_dy_xhat, G, C),
            1.0 / count,
            *plan.args(),
            HAS_WEIGHT=weight is not None,
            **plan.blocks(),
            num_warps=_CONFIG.apply_warps,
        )
    return dx
