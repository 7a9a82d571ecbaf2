"""The Triton backend as fxghost runs it: the autograd Functions over the host functions (eager
mode; one of them with the fused ReLU and residual-add epilogue), the kernels as custom ops
(under ``torch.compile`` with ``backend="triton"``), and the two
:class:`~fxghost.backends.Backend` objects, :data:`EAGER` and :data:`COMPILED`."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ... import _math
from .. import torch_ops
from .._common import (
    Backend,
    Epilogue,
    NormParams,
    RunningStatsUpdate,
    UpdateHook,
    apply_epilogue,
    dense,
    param_grads,
    per_channel,
)
from .._fused import (
    FusedGhostNorm,
    Kernels,
    Saved,
    register_norm_ops,
    relu_differentiable_backward,
    statistics_outputs,
)
from .host import (
    RunningUpdate,
    backward_apply,
    backward_apply_masked,
    backward_sums,
    forward_stats,
    lays_out_as,
    normalize,
)
from .launch import geometry, supported

__all__ = ["COMPILED", "EAGER", "TritonEpilogueGhostNorm", "TritonGhostNorm", "custom_op_norm"]


def _triton_forward(
    xg: Tensor, params: NormParams, update: RunningUpdate | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` from the kernels: ``y`` sample-first, laid out as ``xg``."""
    mean, var, rstd, scale, shift = forward_stats(xg, *params, update)
    y = torch.empty_like(xg.flatten(0, 1))
    normalize(xg, scale, shift, out=y.view(xg.shape))
    return y, mean, var, rstd


def _function_forward(
    xg: Tensor, params: NormParams, update: RunningUpdate | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """:data:`~fxghost.backends._fused.ForwardKernels` of the kernels; ``extra``: the values
    per (group, channel)."""
    return (*_triton_forward(xg, params, update), _per_group(xg))


def _per_group(xg: Tensor) -> int:
    return xg.numel() // (xg.shape[0] * xg.shape[2])


def _triton_backward(
    dy: Tensor, saved: Saved, input_grad: bool, count: int
) -> tuple[Tensor | None, Tensor, Tensor]:
    xg, weight, mean, rstd = saved
    sum_dy, sum_dy_xhat, dbias, dweight = backward_sums(dy, xg, mean, rstd)
    grad_x = (
        backward_apply(dy, xg, mean, rstd, weight, sum_dy, sum_dy_xhat, count)
        if input_grad
        else None
    )
    return grad_x, dweight, dbias


class TritonGhostNorm(FusedGhostNorm):
    """Ghost normalization in fused Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``):
    forward reads x twice and writes y once; backward reads x and dy twice and writes dx once.
    Three launches each way (statistics, their finish, the elementwise pass), the running
    statistics' update included when the kernels make it: in eager mode on a GPU each launch
    and each small torch op costs CPU time that a layer's kernels do not hide."""

    kernels = Kernels(_function_forward, _triton_backward)

    @classmethod
    def run(
        cls, xg: Tensor, params: NormParams, update: RunningUpdate | UpdateHook | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``update``: made by the kernels (a :class:`RunningUpdate`), or a hook called with
        the statistics; either way before anything is saved for backward."""
        if isinstance(update, RunningUpdate):
            forward = functools.partial(_function_forward, update=update)
            return cls.apply(xg, *params, Kernels(forward, _triton_backward), None)  # type: ignore[no-any-return]
        return cls.apply(xg, *params, cls.kernels, update)  # type: ignore[no-any-return]


class TritonEpilogueGhostNorm(torch.autograd.Function):
    """:class:`TritonGhostNorm` with the ReLU epilogue in its kernels:
    ``y = relu(norm(x) + residual)`` (``residual`` optional, laid out as ``xg``), bit for bit the
    unfused graph's (the normalization rounded to the input dtype, the sum rounded again, then
    ReLU). It saves ``y`` besides what :class:`TritonGhostNorm` saves, as an unfused ReLU would:
    the backward kernels mask the incoming gradient with it as ReLU's backward does, and the
    masked gradient is the residual's. Under ``create_graph=True``,
    :func:`fxghost._math.differentiable_backward` of that masked gradient
    (``threshold_backward``, differentiable in ``dy``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        xg: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        residual: Tensor | None,
        eps: float,
        update: RunningUpdate | UpdateHook | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        kernel_update = update if isinstance(update, RunningUpdate) else None
        mean, var, rstd, scale, shift = forward_stats(xg, weight, bias, eps, kernel_update)
        hook = None if isinstance(update, RunningUpdate) else update  # else the kernels update
        mean_s, var_s = statistics_outputs(ctx, xg, weight, bias, eps, mean, var, hook)
        y = torch.empty_like(xg.flatten(0, 1))
        normalize(xg, scale, shift, out=y.view(xg.shape), residual=residual, relu=True)
        ctx.save_for_backward(xg, weight, mean, rstd, y)
        ctx.has_residual = residual is not None
        return y, mean_s, var_s

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor | None, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # Gradients of (xg, weight, bias, residual), then None for eps and the update.
        if dy is None:  # grads are not materialized, and only y is differentiable
            return None, None, None, None, None, None
        xg, weight, mean, rstd, y = ctx.saved_tensors
        needs_x, needs_w, needs_b, needs_r = ctx.needs_input_grad[:4]
        needs_r = needs_r and ctx.has_residual
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            grad_x, dweight, dbias, dres = relu_differentiable_backward(
                dy, y, xg, weight, ctx.eps, ctx.needs_input_grad, needs_r
            )
        else:
            # Sample-first to grouped: views whatever the strides (dim 0 split into (G, c)).
            dyg, mask = dy.view(xg.shape), y.view(xg.shape)
            dweight = dbias = None
            sums = (mean, mean)  # only the residual's gradient: the sums are not read
            if needs_x or needs_w or needs_b:
                sum_dy, sum_dy_xhat, dbias, dweight = backward_sums(dyg, xg, mean, rstd, mask)
                sums = (sum_dy, sum_dy_xhat)
            grad_x, dres = backward_apply_masked(
                dyg, xg, mean, rstd, weight, *sums, _per_group(xg), mask, needs_x, needs_r
            )
        return grad_x, *param_grads(ctx, dweight, dbias), dres, None, None


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
    y, mean, var, rstd = _triton_forward(x, NormParams(weight, bias, eps))
    if x is not xg:  # back to the layout the fake implementation promised
        y = torch.empty_like(xg.flatten(0, 1)).copy_(y)
    return y, mean, var, rstd


def _triton_op_backward(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    x = _triton_dense(xg)
    grad_x, dweight, dbias = _triton_backward(
        dy, Saved(x, weight, mean, rstd), True, _per_group(xg)
    )
    if x is not xg:  # back to the layout the fake implementation promised
        grad_x = torch.empty_like(xg).copy_(grad_x)  # type: ignore[arg-type]
    return grad_x, dweight, dbias  # type: ignore[return-value]


custom_op_norm = register_norm_ops(
    "triton_ghost_norm", ("cuda", "cpu"), _triton_op_forward, _triton_op_backward
)


class _Eager(Backend):
    """Eager calls: :class:`TritonGhostNorm` on a dense view, the running statistics updated by
    its kernels where they can (:func:`_fused_update`); with an epilogue,
    :class:`TritonEpilogueGhostNorm`, unless the residual is not laid out as the input (then
    the epilogue follows the kernels, in torch ops)."""

    name = "triton"
    label = "triton"
    fuses_epilogues = True

    def norm(
        self,
        xg: Tensor,
        params: NormParams,
        update: RunningStatsUpdate | None = None,
        epilogue: Epilogue | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        xg = dense(xg)
        fused = None if update is None else _fused_update(xg, update)
        hook = fused if fused is not None else self.update_hook(update, xg)
        if epilogue is None:
            return TritonGhostNorm.run(xg, params, hook)
        if not _fusable(xg, epilogue):  # after the kernels, in torch ops
            y, mean, var = TritonGhostNorm.run(xg, params, hook)
            return apply_epilogue(y, epilogue), mean, var
        weight, bias, eps = params
        return TritonEpilogueGhostNorm.apply(xg, weight, bias, epilogue.residual, eps, hook)  # type: ignore[no-any-return]


def _fusable(xg: Tensor, epilogue: Epilogue) -> bool:
    """Whether the kernels can apply ``epilogue``: a ReLU, after a residual (if any) that they
    can read with ``xg``'s offsets (its dtype, its layout)."""
    r = epilogue.residual
    return epilogue.relu and (r is None or (isinstance(r, Tensor) and lays_out_as(r, xg)))


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
        or geometry(xg) is None
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
    "triton", "triton (custom op, compiled)", custom_op_norm
)
