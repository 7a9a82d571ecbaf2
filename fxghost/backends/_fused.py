"""Running a kernel family: :class:`FusedGhostNorm`, the autograd Function over a family's
:class:`Kernels` (its forward, and its backward, which gives the input gradient and parameter
sums; differentiable ops under ``create_graph=True``), and :func:`register_norm_ops`, the same
kernels as custom ops for ``torch.compile``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _math
from ._common import NormParams, UpdateHook, define_op, param_dtypes, param_grads, standard

__all__ = [
    "BackwardKernels",
    "ForwardKernels",
    "FusedGhostNorm",
    "Kernels",
    "NormFn",
    "Saved",
    "register_norm_ops",
    "relu_differentiable_backward",
]

# (xg, weight, bias, eps) -> (y, mean, var): y sample-first, shaped like xg.flatten(0, 1), and not
# a view (the caller returns it as is: in-place ops on a view of it, such as ReLU(inplace=True),
# would make autograd clone the whole gradient in backward); mean and var (G, 1, C, 1...).
NormFn = Callable[[Tensor, "Tensor | None", "Tensor | None", float], tuple[Tensor, Tensor, Tensor]]


class Saved(NamedTuple):
    """What a kernel family's forward leaves for its backward: the grouped input, the weight,
    and the per-(group, channel) mean and ``rstd`` (in any shape holding ``(G, C)``)."""

    xg: Tensor
    weight: Tensor | None
    mean: Tensor
    rstd: Tensor


# (xg, params) -> (y, mean, var, rstd, extra): y as NormFn's, the biased variance and the
# statistics in any shape holding (G, C), and extra what the family's backward needs besides.
ForwardKernels = Callable[[Tensor, NormParams], tuple[Tensor, Tensor, Tensor, Tensor, Any]]

# (dy, saved, input_grad, extra) -> (grad_x or None, dweight, dbias), dy grouped like saved.xg:
# dweight = sum(dy * xhat) and dbias = sum(dy) over all samples, (C,) in the statistics dtype
# (the parameter gradients before their cast to the parameters' dtype).
BackwardKernels = Callable[[Tensor, Saved, bool, Any], tuple["Tensor | None", Tensor, Tensor]]


class Kernels(NamedTuple):
    """A kernel family, as :class:`FusedGhostNorm` runs it."""

    forward: ForwardKernels
    backward: BackwardKernels


class FusedGhostNorm(torch.autograd.Function):
    """Ghost normalization in a kernel family's fused kernels: a subclass per family names its
    :class:`Kernels` (and its backward node, ``<subclass>Backward``). The forward runs the
    running-statistics ``update`` hook with the statistics before anything is saved (see
    :meth:`Backend.norm`). The kernels' gradients cannot be differentiated again: under
    ``create_graph=True`` (gradient penalties, Hessian-vector products) they come from
    :func:`fxghost._math.differentiable_backward` instead."""

    kernels: Kernels

    @classmethod
    def run(
        cls, xg: Tensor, params: NormParams, update: UpdateHook | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, var)`` as :meth:`Backend.norm` returns them."""
        return cls.apply(xg, *params, cls.kernels, update)  # type: ignore[no-any-return]

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        xg: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        kernels: Kernels,
        update: UpdateHook | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, rstd, extra = kernels.forward(xg, NormParams(weight, bias, eps))
        mean_s, var_s = statistics_outputs(ctx, xg, weight, bias, eps, mean, var, update)
        ctx.save_for_backward(xg, weight, mean, rstd)
        ctx.kernels, ctx.extra = kernels.backward, extra
        return y, mean_s, var_s

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor | None, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        # One None per non-tensor input (eps, the kernels and the update): autograd drops
        # trailing Nones beyond a Function's inputs.
        if dy is None:  # grads are not materialized, and only y is differentiable
            return None, None, None, None, None, None
        saved = Saved(*ctx.saved_tensors)

        def kernels() -> tuple[Tensor | None, Tensor, Tensor]:
            # Sample-first to grouped: a view whatever the strides (dim 0 split into (G, c)).
            grouped = dy.view(*saved.xg.shape)
            return ctx.kernels(grouped, saved, ctx.needs_input_grad[0], ctx.extra)  # type: ignore[no-any-return]

        return *_input_and_param_grads(ctx, dy, saved, kernels), None, None, None


def statistics_outputs(
    ctx: Any,
    xg: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    mean: Tensor,
    var: Tensor,
    update: UpdateHook | None,
) -> tuple[Tensor, Tensor]:
    """A fused Function's statistics outputs, ``(G, 1, C, 1...)`` and not differentiable, with
    the running-statistics ``update`` hook run on them (call this before saving anything, see
    :meth:`Backend.norm`), and ``ctx`` set for a backward that reads ``eps`` and the
    parameters' dtypes."""
    mean_s, var_s = standard(mean, xg.shape), standard(var, xg.shape)
    if update is not None:
        update(mean_s, var_s)
    # mean and var are not differentiable: no zero gradients need to be made up for them.
    ctx.set_materialize_grads(False)
    ctx.eps = eps
    ctx.param_dtypes = param_dtypes(weight, bias)
    ctx.mark_non_differentiable(mean_s, var_s)
    return mean_s, var_s


def _input_and_param_grads(
    ctx: Any, dy: Tensor, saved: Saved, kernels: Callable[[], tuple[Tensor | None, Tensor, Tensor]]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, grad_weight, grad_bias)`` from the sample-first ``dy``: from ``kernels()``, or
    under ``create_graph=True`` (grad mode on in backward: the result must be differentiable)
    from differentiable ops."""
    if torch.is_grad_enabled():
        grad_x, dweight, dbias = _math.differentiable_backward(
            dy, saved.xg, saved.weight, ctx.eps, ctx.needs_input_grad
        )
    else:
        grad_x, dweight, dbias = kernels()
    return grad_x, *param_grads(ctx, dweight, dbias)


def relu_differentiable_backward(
    dy: Tensor,
    y: Tensor,
    xg: Tensor,
    weight: Tensor | None,
    eps: float | Tensor,
    needs_input_grad: Sequence[bool],
    residual_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, dweight, dbias, grad_residual)`` of a normalization with a fused ReLU epilogue
    (output ``y``) in differentiable ops, for ``create_graph=True``: ``dy`` masked as ReLU's own
    backward masks it (``threshold_backward``, differentiable in ``dy``), then
    :func:`fxghost._math.differentiable_backward`; the residual's gradient is the masked ``dy``,
    grouped like ``xg`` (``None`` unless ``residual_grad``)."""
    g = torch.ops.aten.threshold_backward(dy, y.detach(), 0)
    grad_x, dweight, dbias = _math.differentiable_backward(g, xg, weight, eps, needs_input_grad)
    return grad_x, dweight, dbias, g.view(xg.shape) if residual_grad else None


_NORM_SCHEMA = (
    "(Tensor xg, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor xg, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)"
)


def kernel_norm_fake(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, ...]:
    stats = [
        xg.new_empty((xg.shape[0], xg.shape[2]), dtype=_math.stat_dtype(xg.dtype)) for _ in range(3)
    ]
    return (torch.empty_like(xg.flatten(0, 1)), *stats)


def kernel_norm_backward_fake(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    dtype = _math.stat_dtype(xg.dtype)
    return (
        torch.empty_like(xg),
        xg.new_empty(xg.shape[2], dtype=dtype),
        xg.new_empty(xg.shape[2], dtype=dtype),
    )


def _kernel_op_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    xg, weight, bias, ctx.eps = inputs
    ctx.param_dtypes = param_dtypes(weight, bias)
    ctx.save_for_backward(xg, weight, output[1], output[3])


def register_norm_ops(
    name: str,
    device_types: tuple[str, ...],
    forward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]],
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
) -> Callable[[Tensor, Tensor | None, Tensor | None, float], tuple[Tensor, Tensor, Tensor]]:
    """Register ``fxghost::<name>`` (``(xg, weight, bias, eps) -> (y, mean, var, rstd)``, the
    statistics ``(G, C)``) and ``fxghost::<name>_backward`` (``(dy, xg, weight, mean, rstd) ->
    (grad_x, dweight, dbias)``, ``dy`` grouped like ``xg``) as custom ops with fake
    implementations and autograd: what torch.compile sees of a backend's kernels, opaque to
    inductor. Returns the norm function over the forward op, with :data:`NormFn`'s outputs."""
    fwd = define_op(name, forward, kernel_norm_fake, _NORM_SCHEMA, device_types=device_types)
    bwd = define_op(
        f"{name}_backward",
        backward,
        kernel_norm_backward_fake,
        _BACKWARD_SCHEMA,
        device_types=device_types,
    )

    def backward_rule(ctx: Any, dy: Tensor, *_unused: Tensor | None) -> tuple[Tensor | None, ...]:
        # create_graph=True is reached when dynamo runs the op without AOT autograd (whose traced
        # backward has grad mode off; AOT autograd refuses double backward).
        saved = Saved(*ctx.saved_tensors)

        def kernels() -> tuple[Tensor, Tensor, Tensor]:
            return bwd(dy.unflatten(0, saved.xg.shape[:2]), *saved)  # type: ignore[no-any-return]

        return *_input_and_param_grads(ctx, dy, saved, kernels), None

    fwd.register_autograd(backward_rule, setup_context=_kernel_op_setup)

    def norm(
        xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, _ = fwd(xg, weight, bias, eps)
        return y, standard(mean, xg.shape), standard(var, xg.shape)

    return norm
