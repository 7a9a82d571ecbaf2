"""The torch-ops backend: ghost normalization in plain torch ops, on any device and dtype.

In eager mode an ``autograd.Function`` that saves only the input and per-group statistics and
computes the input gradient from two per-group reductions (float32/float64), or the
decomposition, differentiated by autograd (16-bit inputs). Under ``torch.compile`` the
decomposition with BatchNorm's analytic backward (:func:`ghost_norm_compiled`), which inductor
fuses with neighbouring ops, reaching dynamo as one composite op per call (as does the
running-statistics update): dynamo turns every Python-level tensor op it traces into a graph node
at about a millisecond each, and an ``autograd.Function`` costs it a speculative trace of both the
forward and the backward; as ``CompositeImplicitAutograd`` ops dynamo records each as one node,
from a fake-tensor call (integer arguments are SymInts, so a dynamic batch size stays symbolic),
and AOT autograd then runs the same Python, so inductor sees the same ops. ``torch.export`` traces
through them instead, so that exported programs hold only aten ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _math
from ._common import (
    Backend,
    Epilogue,
    NormParams,
    RunningStatsUpdate,
    Scratch,
    UpdateHook,
    apply_epilogue,
    param_dtypes,
    param_grads,
    per_channel,
    totals,
)
from ._fused import FusedGhostNorm, Kernels, NormFn, Saved

__all__ = [
    "COMPILED",
    "EAGER",
    "EXPORTING",
    "TorchOpsGhostNorm",
    "ghost_norm_compiled",
    "ghost_norm_decomposed",
]

_scratch = Scratch()


class _CanonicalView:
    """A grouped view ``(G, c, C, *S)`` seen as a 3D tensor the reductions run fast on.

    "rows" ``(G, R, C)`` when channels are innermost (channels_last, tabular): reductions over
    dim 1 vectorize along C. "planes" ``(G, c, C, S)`` otherwise (contiguous NCHW): reduce the
    contiguous S first, then c. Both are views of a dense input, so nothing is copied.
    """

    def __init__(self, xg: Tensor) -> None:
        self.shape = xg.shape
        self.groups, self.channels = xg.shape[0], xg.shape[2]
        self.rows = xg.dim() == 3 or xg.stride(2) == 1

    def canon(self, t: Tensor) -> Tensor:
        if self.rows:
            return t.movedim(2, -1).reshape(self.groups, -1, self.channels)
        return t.reshape(self.groups, self.shape[1], self.channels, -1)

    def uncanon(self, t: Tensor) -> Tensor:
        if self.rows:
            return t.view(self.groups, self.shape[1], *self.shape[3:], self.channels).movedim(-1, 2)
        return t.view(self.shape)

    def group_sum(self, t: Tensor) -> Tensor:
        if self.rows:
            return t.sum(dim=1, keepdim=True)
        return t.sum(dim=3, keepdim=True).sum(dim=1, keepdim=True)

    def per_channel(self, v: Tensor) -> Tensor:
        """A ``(C,)`` vector shaped to broadcast against canonical tensors."""
        return v.view(1, 1, -1) if self.rows else v.view(1, 1, -1, 1)


def _torch_ops_forward(
    xg: Tensor, params: NormParams
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """:data:`~._fused.ForwardKernels` in a few large torch ops (float32/float64); ``extra``:
    the values per (group, channel).

    Elementwise steps use plain ``mul``/``add`` with per-(group, channel) operands: on CPU they
    vectorize, whereas ``addcmul`` with broadcast operands runs ~4x slower.
    """
    weight, bias, eps = params
    canonical = _CanonicalView(xg)
    x = canonical.canon(xg)
    count = x.numel() // (canonical.groups * canonical.channels)
    mean = canonical.group_sum(x) / count
    # Two-pass variance: sum((x - mean)^2) stays accurate when |mean| >> std, unlike
    # E[x^2] - mean^2. The centred buffer then becomes the output, in place.
    # The output must not be a view made inside the Function (in-place ops downstream, such
    # as ReLU(inplace=True), would be refused), so compute into a canonical view of it.
    flat = torch.empty_like(xg.flatten(0, 1))
    out = flat.view(xg.shape)  # internal only: the Function returns flat, not a view
    y = canonical.canon(out)
    torch.sub(x, mean, out=y)
    var = canonical.group_sum(torch.mul(y, y, out=_scratch.like(y))) / count
    rstd = torch.rsqrt(var + eps)
    y.mul_(rstd if weight is None else rstd * canonical.per_channel(weight))
    if bias is not None:
        y.add_(canonical.per_channel(bias))
    if y.data_ptr() != out.data_ptr():  # canon() had to copy (non-dense input)
        out.copy_(canonical.uncanon(y))
    return flat, mean, var, rstd, count


def _torch_ops_backward(
    dy: Tensor, saved: Saved, input_grad: bool, count: int
) -> tuple[Tensor | None, Tensor, Tensor]:
    xg, weight, mean, rstd = saved
    canonical = _CanonicalView(xg)
    x, g = canonical.canon(xg), canonical.canon(dy)
    sum_dy = canonical.group_sum(g)
    buf = x - mean
    sum_dy_xhat = canonical.group_sum(buf.mul_(g)) * rstd
    grad_x = None
    if input_grad:
        k = rstd if weight is None else rstd * canonical.per_channel(weight)
        # dx = k * dy + b * x + c with per-(group, channel) b, c; built in the spent buffer.
        b = -k * rstd * sum_dy_xhat / count
        c = -k * sum_dy / count - b * mean
        torch.mul(x, b, out=buf).add_(c)
        grad_x = canonical.uncanon(buf.add_(torch.mul(g, k, out=_scratch.like(g))))
    return (grad_x, *totals(sum_dy, sum_dy_xhat))


class TorchOpsGhostNorm(FusedGhostNorm):
    """Ghost normalization in a few large torch ops; any device, float32/float64."""

    kernels = Kernels(_torch_ops_forward, _torch_ops_backward)


def ghost_norm_decomposed(
    xg: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    update: UpdateHook | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost-normalize ``xg`` in plain differentiable ops.

    This is the formulation inductor sees under ``torch.compile`` (it fuses it with neighbouring
    ops), except for CPU inputs with spatial dims, and the fallback where no fused path applies.
    Returns ``(y, mean, var)``: ``y`` in the input dtype and layout, sample-first
    (``xg.flatten(0, 1)``'s shape), ``mean`` and biased ``var`` of shape ``(G, 1, C, 1...)``.
    ``update`` runs on the statistics before the ops that normalize (and save their inputs).
    """
    xs = xg.to(_math.stat_dtype(xg.dtype))
    var, mean = torch.var_mean(xs, dim=_math.reduce_dims(xg.dim()), correction=0, keepdim=True)
    if update is not None:
        update(mean.detach(), var.detach())
    _, scale, shift = _math.affine_coefficients(mean, var, weight, bias, eps)
    return _math.normalized(xs, scale, shift).to(xg.dtype), mean, var


class _CompiledGhostNorm(torch.autograd.Function):
    """``y`` from ``xg`` and its per-group ``mean`` and ``rstd``, with BatchNorm's analytic
    backward, for torch.compile (:func:`ghost_norm_compiled`).

    Autograd through ``var_mean`` recomputes the mean in backward (one more reduction over the
    input per layer), and its graph is three times plain BatchNorm's. This backward uses the
    saved mean and ``rstd`` and two reductions, as inductor's own decomposition of
    ``native_batch_norm_backward`` does, so inductor fuses it the same way; ``dx`` includes the
    statistics' contribution, so ``mean`` and ``rstd`` come in detached. AOT autograd traces
    both methods into the graph (dynamo sees one op: :mod:`fxghost._compile_ops`). Eager code
    keeps :func:`ghost_norm_decomposed`.

    The statistics are constants to autograd here, so under ``create_graph=True`` (reached when
    dynamo runs without AOT autograd, as with ``backend="eager"``; AOT autograd refuses double
    backward, for plain BatchNorm too) the backward is :func:`differentiable_backward` instead.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, xg: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor
    ) -> Tensor:
        scale, shift = _math.scale_shift(mean, rstd, weight, bias)
        ctx.save_for_backward(xg, weight, mean, rstd)
        ctx.param_dtypes = param_dtypes(weight, bias)
        return _math.cast(_math.normalized(xg.to(mean.dtype), scale, shift), xg.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        xg, weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the result must be differentiable
            # eps is not an input (see ghost_norm_compiled): recovered, up to rounding, from
            # rstd = 1 / sqrt(var + eps).
            var = torch.var(
                _math.cast(xg.detach(), mean.dtype),
                dim=_math.reduce_dims(xg.dim()),
                correction=0,
                keepdim=True,
            )
            eps = rstd.pow(-2) - var
            grad_x, dweight, dbias = _math.differentiable_backward(
                dy, xg, weight, eps, ctx.needs_input_grad
            )
            return grad_x, *param_grads(ctx, dweight, dbias), None, None
        dims = _math.reduce_dims(xg.dim())
        g = dy.view(xg.shape).to(mean.dtype)  # sample-first to grouped: a view
        xhat = (xg.to(mean.dtype) - mean) * rstd
        sum_dy = g.sum(dims, keepdim=True)
        sum_dy_xhat = (g * xhat).sum(dims, keepdim=True)
        count = xg.numel() // (xg.shape[0] * xg.shape[2])
        k = rstd
        if weight is not None:
            k = rstd * weight.to(rstd.dtype).view(_math.channel_shape(xg.dim(), xg.shape[2]))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _math.cast(k * (g - sum_dy / count - xhat * (sum_dy_xhat / count)), xg.dtype)
        dweight = sum_dy_xhat.sum(0).flatten() if ctx.needs_input_grad[1] else None
        dbias = sum_dy.sum(0).flatten() if ctx.needs_input_grad[2] else None
        return grad_x, *param_grads(ctx, dweight, dbias), None, None


def ghost_norm_compiled(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`ghost_norm_decomposed`'s results, with the analytic backward (torch.compile)."""
    # Statistics of the detached input: the Function's backward accounts for them. eps stays
    # out of the Function (dynamo can make it a SymFloat, which a second Function in the same
    # graph then fails to capture).
    var, mean = torch.var_mean(
        xg.to(_math.stat_dtype(xg.dtype)),
        dim=_math.reduce_dims(xg.dim()),
        correction=0,
        keepdim=True,
    )
    mean, var = mean.detach(), var.detach()
    rstd = torch.rsqrt(var + eps)
    y = _CompiledGhostNorm.apply(xg, weight, bias, mean, rstd)
    return y, mean, var


_lib = torch.library.Library("fxghost", "FRAGMENT")
_lib.define(
    "compiled_ghost_norm(Tensor xg, Tensor? weight, Tensor? bias, float eps) "
    "-> (Tensor, Tensor, Tensor)"
)
_lib.impl("compiled_ghost_norm", ghost_norm_compiled, "CompositeImplicitAutograd")
_lib.define(
    "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
    "Tensor(c!)? num_batches_tracked, float? momentum, SymInt requested, Tensor[] means, "
    "Tensor[] vars, SymInt[] counts) -> ()"
)


def _update_impl(*args: Any) -> None:
    """The op's arguments, in its schema's order: a :class:`RunningStatsUpdate`'s fields, then
    the groups' means, variances and counts."""
    *fields, means, variances, counts = args
    update = RunningStatsUpdate(*fields)
    # compiling=True explicitly: this runs in AOT autograd's trace, after dynamo, where
    # torch.compiler.is_compiling() is False in torch 2.11 (True in 2.14), and the eager path's
    # C kernels and weight cache must not see fake tensors.
    groups = list(zip(means, variances, counts, strict=True))
    _math.update_running_stats(*update, groups, compiling=True)


_lib.impl("update_running_stats", _update_impl, "CompositeImplicitAutograd")


def _composite_ghost_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`ghost_norm_compiled`, as one node in dynamo's graph."""
    return torch.ops.fxghost.compiled_ghost_norm(xg, weight, bias, eps)  # type: ignore[no-any-return]


def _composite_update(
    update: RunningStatsUpdate, groups: Sequence[tuple[Tensor, Tensor, int]]
) -> None:
    """:func:`fxghost._math.update_running_stats`, as one node in dynamo's graph."""
    torch.ops.fxghost.update_running_stats(
        *update,
        [m for m, _, _ in groups],
        [v for _, v, _ in groups],
        [n for _, _, n in groups],
    )


class _Eager(Backend):
    """Eager calls in torch ops: :class:`TorchOpsGhostNorm` (float32/float64), else the
    decomposition."""

    name = "torch"
    label = "torch"

    def norm(
        self,
        xg: Tensor,
        params: NormParams,
        update: RunningStatsUpdate | None = None,
        epilogue: Epilogue | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        # The Function's in-place steps and canonical layouts are written for float32/float64;
        # 16-bit inputs, whose statistics are float32, take the decomposition.
        hook = self.update_hook(update, xg)
        if xg.dtype in (torch.float32, torch.float64):
            y, mean, var = TorchOpsGhostNorm.run(xg, params, hook)
        else:
            y, mean, var = ghost_norm_decomposed(xg, *params, hook)
        return apply_epilogue(y, epilogue), mean, var


class _Traced(Backend):
    """A backend under ``torch.compile`` or ``torch.export``: :meth:`traced_norm`, then one
    update for all of a batch's ghost batches (one node in dynamo's graph). The order does not
    matter here: a compiled checkpointed region's recomputation is AOT autograd's, which repeats
    no buffer update (the compiled reference's BatchNorm calls update once too)."""

    one_update_per_batch = True

    def traced_norm(self, xg: Tensor, params: NormParams) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def fused_norm(
        self, xg: Tensor, params: NormParams, epilogue: Epilogue
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(y, mean, var)`` with ``epilogue`` applied in the kernels, or ``None`` where they
        do not apply it (then :meth:`norm` applies it after :meth:`traced_norm`)."""
        return None

    def norm(
        self,
        xg: Tensor,
        params: NormParams,
        update: RunningStatsUpdate | None = None,
        epilogue: Epilogue | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        fused = None if epilogue is None else self.fused_norm(xg, params, epilogue)
        y, mean, var = fused if fused is not None else self.traced_norm(xg, params)
        if update is not None:
            self.apply_update(update, per_channel(xg), mean, var)
        return (y if fused is not None else apply_epilogue(y, epilogue)), mean, var


class _Compiled(_Traced):
    name = "torch"
    label = "torch (compiled)"

    def traced_norm(self, xg: Tensor, params: NormParams) -> tuple[Tensor, Tensor, Tensor]:
        return _composite_ghost_norm(xg, *params)

    def update_running_stats(
        self, update: RunningStatsUpdate, groups: Sequence[tuple[Tensor, Tensor, int]]
    ) -> None:
        _composite_update(update, groups)


class _Exporting(_Traced):
    name = "torch"
    label = "torch (exported)"
    traced_update = True

    def traced_norm(self, xg: Tensor, params: NormParams) -> tuple[Tensor, Tensor, Tensor]:
        return ghost_norm_compiled(xg, *params)


#: ``(xg, weight, bias, eps, residual) -> (y, mean, var)`` with ``y = relu(bn(xg) + residual)``
#: (``relu(bn(xg))`` where ``residual`` is None): a kernel family's fused epilogue as a custom op.
EpilogueNormFn = Callable[
    [Tensor, "Tensor | None", "Tensor | None", float, "Tensor | None"],
    tuple[Tensor, Tensor, Tensor],
]


class CustomOpCompiled(_Traced):
    """A kernel family under ``torch.compile``: its kernels as a custom op (``norm``), with the
    ReLU and residual-add epilogue in another (``epilogue_norm``) where it has one, and the
    running-statistics update as the torch backend's composite op."""

    def __init__(
        self, name: str, label: str, norm: NormFn, epilogue_norm: EpilogueNormFn | None = None
    ) -> None:
        self.name, self.label, self._norm = name, label, norm
        self._epilogue_norm = epilogue_norm
        self.fuses_epilogues = epilogue_norm is not None

    def traced_norm(self, xg: Tensor, params: NormParams) -> tuple[Tensor, Tensor, Tensor]:
        return self._norm(xg, *params)

    def fused_norm(
        self, xg: Tensor, params: NormParams, epilogue: Epilogue
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        residual = epilogue.residual
        if (
            self._epilogue_norm is None
            or not epilogue.relu
            or (residual is not None and residual.dtype != xg.dtype)
        ):
            return None
        return self._epilogue_norm(xg, *params, residual)

    def update_running_stats(
        self, update: RunningStatsUpdate, groups: Sequence[tuple[Tensor, Tensor, int]]
    ) -> None:
        COMPILED.update_running_stats(update, groups)


EAGER: Backend = _Eager()
COMPILED: Backend = _Compiled()
EXPORTING: Backend = _Exporting()
