"""The host functions of the Triton backend: one call per job (the statistics, the
normalization, the backward sums, the input gradient), each launching its kernels through a
cached :class:`~.launch.LaunchPlan`. The normalization can end in the ReLU epilogue (with a
residual add), and the backward functions then take the saved output as ReLU's mask
(``mask=``).

The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (which must be
set before triton is imported). Inputs may be float32, float16 or bfloat16; every statistic is
float32.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import kernels
from .launch import LaunchPlan, geometry, launch_plan, run_kernel

__all__ = [
    "RunningUpdate",
    "backward_apply",
    "backward_apply_masked",
    "backward_reduce",
    "backward_sums",
    "forward_stats",
    "normalize",
    "stats",
]


#: A kernel and its leading arguments (the plan's integer arguments follow them).
Launch = tuple[Any, tuple[Any, ...]]
#: Constexpr flags, ahead of the plan's tile sizes.
Flags = tuple[tuple[str, bool], ...]


def _split_reduction(
    lp: LaunchPlan,
    xg: Tensor,
    partial: Launch,
    finish: Launch,
    flags: Flags = (),
    partial_flags: Flags = (),
) -> None:
    """A reduction split over several programs per group: ``partial`` over the plan's reduction
    grid, each program writing its partials (``partial_flags`` are its constexprs), then
    ``finish``, which merges them (``flags`` are its constexprs), on ``xg``'s device and
    stream."""
    (partial_kernel, partial_args), (finish_kernel, finish_args) = partial, finish
    with _device_guard(xg):
        stream = _stream(lp)
        reduce_args = (*partial_args, *lp.reduce_args)
        run_kernel(
            lp,
            partial_kernel,
            lp.reduce_grid,
            stream,
            reduce_args,
            (*partial_flags, *lp.reduce_blocks),
            lp.reduce_warps,
        )
        consts = (*flags, *lp.finish_blocks)
        run_kernel(lp, finish_kernel, lp.finish_grid, stream, finish_args, consts, 4)


def _elementwise(
    lp: LaunchPlan, xg: Tensor, kernel: Any, args: tuple[Any, ...], flags: Flags = ()
) -> None:
    """``kernel`` over the plan's elementwise grid, one tile per program (``flags`` are its
    constexprs), on ``xg``'s device and stream."""
    consts = (*flags, *lp.apply_blocks)
    with _device_guard(xg):
        stream = _stream(lp)
        all_args = (*args, *lp.apply_args)
        run_kernel(lp, kernel, lp.apply_grid, stream, all_args, consts, lp.apply_warps)


def _stream(lp: LaunchPlan) -> int:
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


def _matching(dy: Tensor, xg: Tensor, what: str = "dy") -> Tensor:
    """``dy`` laid out like ``xg`` (the kernels address both with the same offsets)."""
    if dy.shape != xg.shape:
        raise ValueError(
            f"fxghost triton backend: {what} shape {tuple(dy.shape)} != {tuple(xg.shape)}"
        )
    if dy.stride() == xg.stride() and dy.device == xg.device:
        return dy
    if dy.device == xg.device and geometry(dy) == geometry(xg):
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
    lp = launch_plan(xg)
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
    outputs = (mean, var, rstd, coef, w, b, ema, rmean, rvar, nbt)
    flags = (
        ("HAS_WEIGHT", weight is not None),
        ("HAS_BIAS", bias is not None),
        ("UPDATE", update is not None),
    )
    _split_reduction(
        lp,
        xg,
        (kernels.stats_partial_kernel, (xg, partials)),
        (kernels.stats_finish_kernel, (partials, *outputs, G, C, lp.split, eps, decay, bessel)),
        flags,
    )
    return mean, var, rstd, coef[0], coef[1]


def stats(xg: Tensor) -> tuple[Tensor, Tensor]:
    """Per ``(group, channel)`` mean and biased variance of ``xg``, float32, shape ``(G, C)``."""
    # eps only enters rstd, scale and shift, which are dropped here.
    mean, var, *_ = forward_stats(xg, None, None, 1.0)
    return mean, var


def normalize(
    xg: Tensor,
    scale: Tensor,
    shift: Tensor,
    out: Tensor | None = None,
    residual: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """``xg * scale[g, ch] + shift[g, ch]`` in float32, in ``xg``'s dtype and layout: into ``out``
    (laid out as ``xg``) when given. ``scale`` and ``shift`` hold ``G * C`` values.

    The epilogue: ``residual`` (laid out as ``xg``, of its dtype) is added to that, then with
    ``relu`` ``v < 0 ? 0 : v`` is applied, each rounded to ``xg``'s dtype as the unfused ops'
    results are: bit for bit ``torch.relu(normalize(xg, scale, shift) + residual)``."""
    lp = launch_plan(xg)
    y = _like(xg) if out is None else out
    if y.shape != xg.shape or y.stride() != xg.stride():
        raise ValueError("fxghost: normalize needs an output laid out as its input")
    if residual is not None and not lays_out_as(residual, xg):
        raise ValueError("fxghost: normalize needs a residual laid out as its input")
    # Without a residual its pointer is never read: any tensor of the input's dtype will do.
    args = (xg, y, _f32(scale), _f32(shift), xg if residual is None else residual)
    flags = (("RESIDUAL", residual is not None), ("RELU", relu))
    _elementwise(lp, xg, kernels.normalize_kernel, args, flags)
    return y


def lays_out_as(t: Tensor, xg: Tensor) -> bool:
    """Whether the kernels can read ``t`` with ``xg``'s offsets: the same shape, dtype, device,
    and strides (or, where sizes of 1 make strides differ, the same dense block)."""
    return (
        t.shape == xg.shape
        and t.dtype == xg.dtype
        and t.device == xg.device
        and (t.stride() == xg.stride() or _same_block(t, xg))
    )


def _same_block(t: Tensor, xg: Tensor) -> bool:
    g = geometry(xg)
    return g is not None and geometry(t) == g


def backward_sums(
    dy: Tensor, xg: Tensor, mean: Tensor, rstd: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum dy, sum dy * xhat)`` per ``(group, channel)``, float32 ``(G, C)``, and their sums
    over the groups, float32 ``(C,)``: the bias and weight gradients. Two kernel launches.

    ``xhat = (xg - mean) * rstd``; ``mean`` and ``rstd`` hold ``G * C`` values. With ``mask``
    (the output of a ReLU epilogue, grouped like ``xg``), ``dy`` is 0 where ``mask <= 0``, as
    ReLU's backward makes it.
    """
    lp = launch_plan(xg)
    G, C = lp.G, lp.C
    dy = _matching(dy, xg)
    m = dy if mask is None else _matching(mask, xg, "mask")  # not read without a mask
    partials = torch.empty((2, G, lp.split, C), dtype=torch.float32, device=xg.device)
    sums = torch.empty((2, G, C), dtype=torch.float32, device=xg.device)
    # Separate tensors, not views of one: they leave as separate outputs of a custom op.
    dbias = torch.empty(C, dtype=torch.float32, device=xg.device)
    dweight = torch.empty(C, dtype=torch.float32, device=xg.device)
    _split_reduction(
        lp,
        xg,
        (kernels.backward_reduce_kernel, (dy, xg, _f32(mean), _f32(rstd), partials, m, G)),
        (kernels.backward_finish_kernel, (partials, sums, dbias, dweight, G, C, lp.split)),
        partial_flags=(("MASKED", mask is not None),),
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
    dx, _ = backward_apply_masked(dy, xg, mean, rstd, weight, sum_dy, sum_dy_xhat, count)
    assert dx is not None
    return dx


def backward_apply_masked(
    dy: Tensor,
    xg: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    mask: Tensor | None = None,
    input_grad: bool = True,
    residual_grad: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dx, dres)``: :func:`backward_apply`'s input gradient (with ``input_grad``) for ``dy``
    masked as ReLU's backward masks it with ``mask`` (the output of a ReLU epilogue, grouped
    like ``xg``: 0 where ``mask <= 0``), and with ``residual_grad`` that masked ``dy`` itself,
    the residual's gradient; each in ``xg``'s dtype and layout, ``None`` where not asked for.
    The sums must be of the same masked ``dy`` (:func:`backward_sums` with the same ``mask``).
    """
    if not (input_grad or residual_grad):
        return None, None
    lp = launch_plan(xg)
    dy = _matching(dy, xg)
    m = dy if mask is None else _matching(mask, xg, "mask")
    mean = _f32(mean)
    w = mean if weight is None else _f32(weight)
    dx = _like(xg) if input_grad else None
    dres = _like(xg) if residual_grad else None
    sums = (_f32(sum_dy), _f32(sum_dy_xhat))
    # Pointers that are never read (w without a weight, dx or dres where not asked for, m
    # without a mask) take any tensor of the right dtype.
    out = dx if dx is not None else dres
    args = (dy, xg, out, mean, _f32(rstd), w, *sums, m, out if dres is None else dres, 1.0 / count)
    flags = (
        ("HAS_WEIGHT", weight is not None),
        ("MASKED", mask is not None),
        ("INPUT_GRAD", input_grad),
        ("RESIDUAL_GRAD", residual_grad),
    )
    _elementwise(lp, xg, kernels.backward_apply_kernel, args, flags)
    return dx, dres
