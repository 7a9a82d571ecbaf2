"""What the kernel backends share: the autograd Function's backward (the kernels' input gradient
and parameter sums, or differentiable ops under ``create_graph=True``), and the registration of a
backend's kernels as custom ops for ``torch.compile``."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _math
from ._dims import dims

__all__ = [
    "Backend",
    "BackwardKernels",
    "FusedGhostNorm",
    "dense",
    "NormFn",
    "RunningStatsUpdate",
    "Scratch",
    "UpdateHook",
    "forward_outputs",
    "param_dtypes",
    "param_grads",
    "per_channel",
    "register_norm_ops",
    "standard",
    "totals",
]

#: What a Function's forward calls with the ``(G, 1, C, 1...)`` mean and biased variance it
#: computed, before it returns (and so before autograd saves anything): the running-statistics
#: update of :meth:`Backend.norm`.
UpdateHook = Callable[[Tensor, Tensor], None]


class RunningStatsUpdate(NamedTuple):
    """A training call's running-statistics update: the ghost batches of a batch of
    ``requested`` update the buffers in closed form, one after another, with momentum
    ``momentum / requested`` each (:func:`fxghost._math.update_running_stats`)."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    momentum: float | None
    requested: int


def per_channel(xg: Tensor) -> int:
    """How many values of each channel a ghost batch of the grouped view ``xg`` holds."""
    # A product of sizes, not numel() // (G * C): under torch.compile with dynamic shapes the
    # sizes are symbols, and a product of them simplifies where a division may not.
    return xg.shape[1] * math.prod(xg.shape[3:])


class Backend:
    """How one implementation family runs a layer call. ``name`` is the family, as
    ``transform(backend=...)`` names it; ``label`` says which of its paths this is, for the
    report."""

    name = ""
    label = ""

    def norm(
        self,
        xg: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        update: RunningStatsUpdate | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, var)`` of a grouped view: ``y`` sample-first and not a view, the biased
        variance; statistics ``(G, 1, C, 1...)``. With ``update``, these ghost batches, the
        next ones of the batch, update the running statistics before anything is saved for
        backward: under activation checkpointing PyTorch ends the recomputation as soon as the
        last tensor the backward needs is saved again (its default early stop), and an update
        after that would run in the forward but not in the recomputation, where each
        BatchNorm call of the chunked reference updates again."""
        raise NotImplementedError

    def norm_batch(
        self,
        main: Tensor,
        tail: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        update: RunningStatsUpdate | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """A batch's ``(y_main, y_tail)``: :meth:`norm` of its whole ghost batches ``main``,
        then of its shorter last one ``tail`` when there is one, each updating the running
        statistics with its own ghost batches, as the reference's BatchNorm calls do one after
        another."""
        y_main = self.norm(main, weight, bias, eps, update)[0]
        return y_main, None if tail is None else self.norm(tail, weight, bias, eps, update)[0]

    def apply_update(
        self, update: RunningStatsUpdate, count: int, mean: Tensor, var: Tensor
    ) -> None:
        """``update`` with the statistics ``(G, 1, C, 1...)`` of its next ghost batches, of
        ``count`` values per channel each."""
        self.update_running_stats(update, [(mean, var, count)])

    def update_hook(self, update: RunningStatsUpdate | None, xg: Tensor) -> UpdateHook | None:
        """:meth:`apply_update` of ``update`` for the ghost batches ``xg``, as the
        :data:`UpdateHook` of a Function's forward."""
        if update is None:
            return None
        return functools.partial(self.apply_update, update, per_channel(xg))

    #: What :meth:`update_running_stats` passes to :func:`fxghost._math.update_running_stats`:
    #: whether it runs under a trace, and a family's kernel for the weighted sums.
    traced_update = False
    accumulate: _math.Accumulate | None = None

    def update_running_stats(
        self, update: RunningStatsUpdate, groups: Sequence[tuple[Tensor, Tensor, int]]
    ) -> None:
        """:func:`fxghost._math.update_running_stats` of ``update`` with ``groups``, its
        ``(mean, biased_var, count)`` per group of equal-sized ghost batches."""
        # RunningStatsUpdate's fields are update_running_stats' first arguments, in order.
        _math.update_running_stats(
            *update, groups, compiling=self.traced_update, accumulate=self.accumulate
        )

    def __repr__(self) -> str:
        return f"<fxghost backend {self.label}>"


# (xg, weight, bias, eps) -> (y, mean, var): y sample-first, shaped like xg.flatten(0, 1), and not
# a view (the caller returns it as is: in-place ops on a view of it, such as ReLU(inplace=True),
# would make autograd clone the whole gradient in backward); mean and var (G, 1, C, 1...).
NormFn = Callable[[Tensor, "Tensor | None", "Tensor | None", float], tuple[Tensor, Tensor, Tensor]]

# (dy, x, weight, mean, rstd, input_grad, extra) -> (grad_x or None, dweight, dbias), where extra
# is what the Function's forward stored for its kernels in ctx.extra, and dweight = sum(dy * xhat)
# and dbias = sum(dy) over all samples, (C,) in the statistics dtype: the parameter gradients
# before their cast to the parameters' dtype.
BackwardKernels = Callable[
    [Tensor, Tensor, "Tensor | None", Tensor, Tensor, bool, Any],
    tuple["Tensor | None", Tensor, Tensor],
]


class Scratch(threading.local):
    """One reusable buffer per thread for full-size temporaries on CPU.

    glibc hands large freed blocks back to the OS, so on CPU every fresh full-size tensor pays
    page faults on first touch (four live 4 MB temporaries cost 6.5 ms instead of 0.5 ms).
    Reusing one buffer for the temporaries that die inside an op avoids that; it costs one
    activation-sized buffer per thread. CUDA has a caching allocator and does not need this.
    """

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def like(self, t: Tensor) -> Tensor:
        if t.device.type != "cpu":
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        n = t.numel()
        buf = self.buf
        if buf is None or buf.numel() < n or buf.dtype != t.dtype:
            buf = self.buf = torch.empty(n, dtype=t.dtype)
        return buf[:n].view(t.shape)


def standard(stat: Tensor, shape: Sequence[int]) -> Tensor:
    """``stat`` holding ``(G, C)`` values, shaped ``(G, 1, C, 1...)`` for a grouped ``shape``."""
    return stat.reshape(shape[0], 1, shape[2], *([1] * (len(shape) - 3)))


def forward_outputs(
    ctx: Any,
    xg: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    stats: tuple[Tensor, ...],
    kernels: BackwardKernels,
    extra: Any,
    update: UpdateHook | None = None,
) -> tuple[Tensor, Tensor]:
    """What every Function's forward ends with: the running-statistics ``update`` (before
    anything is saved, see :meth:`Backend.norm`); save ``x``, ``weight``, ``eps``, the
    parameters' dtypes and the per-group ``(mean, rstd)``, and the backward ``kernels`` with
    their ``extra`` argument, for backward; return ``(mean, var)`` in the standard shape, marked
    non-differentiable. ``stats`` is ``(mean, rstd, var)`` in any shape holding ``(G, C)``."""
    mean, rstd, var = stats
    mean_s, var_s = standard(mean, xg.shape), standard(var, xg.shape)
    if update is not None:
        update(mean_s, var_s)
    ctx.save_for_backward(xg, weight, mean, rstd)
    # mean and var are not differentiable: no zero gradients need to be made up for them.
    ctx.set_materialize_grads(False)
    ctx.kernels, ctx.extra, ctx.eps = kernels, extra, eps
    ctx.param_dtypes = param_dtypes(weight, bias)
    ctx.mark_non_differentiable(mean_s, var_s)
    return mean_s, var_s


def param_dtypes(
    weight: Tensor | None, bias: Tensor | None
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """What :func:`param_grads` needs to know of the parameters (a Function keeps the bias's
    dtype, not the bias: its value plays no part in the backward)."""
    return (None if weight is None else weight.dtype), (None if bias is None else bias.dtype)


def param_grads(
    ctx: Any, dweight: Tensor | None, dbias: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias gradients from the ``(C,)`` totals, in the parameters' dtypes
    (``ctx.param_dtypes``, from :func:`param_dtypes`); ``None`` for a parameter that is missing
    or needs none."""
    needs_w, needs_b = ctx.needs_input_grad[1:3]
    w_dtype, b_dtype = ctx.param_dtypes
    return (
        _math.cast(dweight, w_dtype) if needs_w and dweight is not None else None,
        _math.cast(dbias, b_dtype) if needs_b and dbias is not None else None,
    )


def totals(sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
    """``(dweight, dbias)``: per-(group, channel) sums, in any shape holding ``(G, C)``, summed
    over the groups."""
    return sum_dy_xhat.sum(0).flatten(), sum_dy.sum(0).flatten()


class FusedGhostNorm(torch.autograd.Function):
    """The backward every kernel Function shares: ``ctx.kernels`` (set by its forward through
    :func:`forward_outputs`) give the input gradient and the two per-(group, channel) sums,
    which make the weight and bias gradients. The kernels' gradients cannot be differentiated
    again: under ``create_graph=True`` (gradient penalties, Hessian-vector products) they come
    from :func:`fxghost._math.differentiable_backward` instead."""

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor | None, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        # One None per non-tensor input (eps, and the running-statistics update): autograd
        # drops trailing Nones beyond a Function's inputs.
        if dy is None:  # grads are not materialized, and only y is differentiable
            return None, None, None, None, None
        xg, weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the result must be differentiable
            grad_x, dweight, dbias = _math.differentiable_backward(
                dy, xg, weight, ctx.eps, ctx.needs_input_grad
            )
        else:
            dy = dy.view(*xg.shape)  # splitting dim 0 into (G, c): a view whatever the strides
            grad_x, dweight, dbias = ctx.kernels(
                dy, xg, weight, mean, rstd, ctx.needs_input_grad[0], ctx.extra
            )
        return grad_x, *param_grads(ctx, dweight, dbias), None, None


_NORM_SCHEMA = (
    "(Tensor xg, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor xg, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)"
)


def _kernel_norm_fake(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, ...]:
    stats = [
        xg.new_empty((xg.shape[0], xg.shape[2]), dtype=_math.stat_dtype(xg.dtype)) for _ in range(3)
    ]
    return (torch.empty_like(xg.flatten(0, 1)), *stats)


def _kernel_norm_backward_fake(
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
    fwd = torch.library.custom_op(
        f"fxghost::{name}",
        forward,
        mutates_args=(),
        device_types=device_types,
        schema=_NORM_SCHEMA,
    )
    fwd.register_fake(_kernel_norm_fake)
    bwd = torch.library.custom_op(
        f"fxghost::{name}_backward",
        backward,
        mutates_args=(),
        device_types=device_types,
        schema=_BACKWARD_SCHEMA,
    )
    bwd.register_fake(_kernel_norm_backward_fake)

    def backward_rule(
        ctx: Any, dy: Tensor, *_unused: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        xg, weight, mean, rstd = ctx.saved_tensors
        # create_graph=True: reached when dynamo runs the op without AOT autograd (whose traced
        # backward has grad mode off; AOT autograd refuses double backward).
        if torch.is_grad_enabled():
            grad_x, dweight, dbias = _math.differentiable_backward(
                dy, xg, weight, ctx.eps, ctx.needs_input_grad
            )
        else:
            grad_x, dweight, dbias = bwd(dy.unflatten(0, xg.shape[:2]), xg, weight, mean, rstd)
        return grad_x, *param_grads(ctx, dweight, dbias), None

    fwd.register_autograd(backward_rule, setup_context=_kernel_op_setup)

    def norm(
        xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, _ = fwd(xg, weight, bias, eps)
        return y, standard(mean, xg.shape), standard(var, xg.shape)

    return norm


def dense(xg: Tensor) -> Tensor:
    """``xg``, or a contiguous copy when it is not laid out as the kernels read (a slice; or a
    layout that compiled code hands over and its trace did not see)."""
    return xg if dims(xg) is not None else xg.contiguous()
