"""The Triton kernels of ghost BatchNorm, on a grouped view ``(G, c, C, *spatial)``.

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

* ``stats_partial_kernel``: per-lane Welford over each program's share of a group's tiles, lanes
  merged with Chan's formula into per-program ``(count, mean, M2)`` partials, which
  ``stats_finish_kernel`` merges per ``(group, channel)``. Splitting a group over several programs
  keeps the GPU busy when there are few groups or channels; centring at every step keeps large
  counts with a large mean exact (no ``E[x^2] - E[x]^2`` cancellation).
* ``normalize_kernel``: one tile per program, ``y = x * scale + shift`` in float32; with the
  fused epilogue, ``y = relu(y + residual)``, rounded as the unfused ops round.
* ``backward_reduce_kernel``: per-lane float32 sums of ``dy`` and ``dy * (x - mean)``, split like
  the statistics; ``backward_finish_kernel`` sums the partials.
* ``backward_apply_kernel``: one tile per program, the BatchNorm input gradient.

With the ReLU epilogue, the backward kernels mask ``dy`` with the saved output ``y`` as ReLU's own
backward does (``threshold_backward(dy, y, 0)``: 0 where ``y <= 0``, so a NaN output passes its
gradient), in the same order of operations as the unfused graph: the sums and ``dx`` are then the
unfused ones bit for bit, and ``backward_apply_kernel`` also writes the masked ``dy``, the
residual's gradient.

Everything accumulates in float32. The kernels' pointer parameters (named ``*_ptr``) come first,
then the scalars, then the constexprs: :func:`fxghost.backends.triton.launch.run_kernel` relies on
that order. Triton is optional: without it this module still imports (the kernels are then plain
functions nothing launches) and :func:`available` is False.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: keep the module importable, available() is False
    triton = None
    tl = None

__all__ = [
    "available",
    "backward_apply_kernel",
    "backward_finish_kernel",
    "backward_reduce_kernel",
    "interpreting",
    "normalize_kernel",
    "stats_finish_kernel",
    "stats_partial_kernel",
    "triton_version",
]


def available() -> bool:
    """Whether Triton is installed."""
    return triton is not None


def triton_version() -> tuple[int, ...] | None:
    """Triton's ``(major, minor)`` version, or None without Triton (or with a version string
    this cannot read)."""
    if triton is None:
        return None
    try:
        return tuple(int(p) for p in triton.__version__.split(".")[:2])
    except ValueError:
        return None


@functools.cache
def interpreting() -> bool:
    """Whether Triton runs its interpreter on the CPU (``TRITON_INTERPRET=1``). Read once: the
    variable only takes effect when set before triton is imported, which this module does."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _jit(fn: Callable[..., Any]) -> Any:
    return triton.jit(fn) if triton is not None else fn


# Whether the kernels run in the interpreter, as a constexpr the kernels read (compiled for a
# GPU, the branches it guards are dropped).
_INTERPRETED = tl.constexpr(interpreting()) if tl is not None else False


@_jit
def _bf16_bits(v):  # pragma: no cover - traced by triton
    """The bits of the float32 ``v`` rounded to the nearest bfloat16, ties to even (a NaN stays
    a NaN), as uint32 ``0x0000XXXX``."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    return tl.where(v != v, (bits >> 16) | 0x40, rounded)


@_jit
def _to_output(v, ty: tl.constexpr):  # pragma: no cover - traced by triton
    """The float32 ``v`` in the output dtype ``ty``, rounded to nearest even as a GPU and torch
    round it. The interpreter truncates float32 to bfloat16 (and mishandles subnormals): there
    the conversion is made on the bits, so that interpreted results are the GPU's, and a fused
    epilogue rounds as the unfused torch ops do."""
    if _INTERPRETED:
        if ty == tl.bfloat16:
            return _bf16_bits(v).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ty)


@_jit
def _rounded(v, ty: tl.constexpr):  # pragma: no cover - traced by triton
    """The float32 ``v`` rounded to the dtype ``ty`` as :func:`_to_output` rounds it, in
    float32 (exact: every value of ``ty`` is a float32)."""
    if _INTERPRETED:
        if ty == tl.bfloat16:
            return (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)
    return v.to(ty).to(tl.float32)


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
def stats_partial_kernel(
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
def stats_finish_kernel(
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
def normalize_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    shift_ptr,
    res_ptr,
    A,
    C,
    B,
    n_cb,
    n_bt,
    n_tiles,
    RESIDUAL: tl.constexpr,
    RELU: tl.constexpr,
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
    ty = y_ptr.dtype.element_ty
    if RESIDUAL or RELU:
        # The epilogue as the unfused graph computes it: the normalization's output rounded to
        # the output dtype, the residual added in float32 and the sum rounded again, then ReLU
        # (v < 0 ? 0 : v: a NaN stays NaN, as torch.relu's). Free for float32.
        y = _rounded(y, ty)
        if RESIDUAL:
            r = tl.load(res_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            y = _rounded(y + r, ty)
        if RELU:
            y = tl.where(y < 0.0, 0.0, y)
    tl.store(y_ptr + base + offs, _to_output(y, ty), mask=mask)


@_jit
def backward_reduce_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    part_ptr,
    m_ptr,
    G,
    A,
    C,
    B,
    n_cb,
    n_bt,
    n_tiles,
    tiles_per_split,
    SPLIT,
    MASKED: tl.constexpr,
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
        if MASKED:  # ReLU's backward: no gradient where the saved output is <= 0
            m = tl.load(m_ptr + base + offs, mask=mask, other=1.0).to(tl.float32)
            dy = tl.where(m <= 0.0, 0.0, dy)
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
def backward_finish_kernel(
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
    ``stats_finish_kernel``."""
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
def backward_apply_kernel(
    dy_ptr,
    x_ptr,
    dx_ptr,
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    sum_dy_ptr,
    sum_dyx_ptr,
    m_ptr,
    dres_ptr,
    inv_count,
    A,
    C,
    B,
    n_cb,
    n_bt,
    n_tiles,
    HAS_WEIGHT: tl.constexpr,
    MASKED: tl.constexpr,
    INPUT_GRAD: tl.constexpr,
    RESIDUAL_GRAD: tl.constexpr,
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
    if MASKED:  # as in backward_reduce_kernel
        m = tl.load(m_ptr + base + offs, mask=mask, other=1.0).to(tl.float32)
        dy = tl.where(m <= 0.0, 0.0, dy)
    if RESIDUAL_GRAD:  # the add's gradient: the masked dy itself (exact in dy's dtype)
        tl.store(dres_ptr + base + offs, _to_output(dy, dres_ptr.dtype.element_ty), mask=mask)
    if INPUT_GRAD:
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dx = a[None, :, None] * (
            dy - b[None, :, None] - (x - mean[None, :, None]) * c[None, :, None]
        )
        tl.store(dx_ptr + base + offs, _to_output(dx, dx_ptr.dtype.element_ty), mask=mask)
