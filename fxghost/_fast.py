"""Eager fast paths for ghost normalization, and the choice between them.

Autograd through the plain-op decomposition keeps four full-size intermediates alive and runs
several slow reductions. Here a custom ``autograd.Function`` saves only the input and per-group
statistics, and computes the input gradient from two per-group reductions:

    dx = w * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))        (per group and channel)

The statistics and elementwise work run in fused kernels where they exist: Triton on CUDA
(:mod:`fxghost._triton`), compiled C on CPU (:mod:`fxghost._cpu`; in eager mode called from the
same Function written in C++, :mod:`fxghost._cpu_autograd`, where that builds), torch ops
otherwise. Under ``torch.compile`` the C kernels run as custom ops on CPU inputs with spatial dims
(inductor's code for them was slower); everywhere else the decomposition in :mod:`fxghost._math`,
with BatchNorm's analytic backward, so that inductor can fuse it with neighbouring ops
(``FXGHOST_COMPILED_NORM=kernels`` gives it the Triton kernels as custom ops instead).

The kernels' gradients cannot be differentiated again. Under ``create_graph=True`` (double
backward: gradient penalties, Hessian-vector products) every backward here computes them instead
in differentiable torch ops (:func:`fxghost._math.differentiable_backward`); the first-order
backward is untouched.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _compile_ops, _cpu, _cpu_autograd, _math, _triton

__all__ = ["NormFn", "select", "training_norm"]

# (xg, weight, bias, eps) -> (y, mean, var): y sample-first, shaped like xg.flatten(0, 1), and not
# a view (the caller returns it as is: in-place ops on a view of it, such as ReLU(inplace=True),
# would make autograd clone the whole gradient in backward); mean and var (G, 1, C, 1...).
NormFn = Callable[[Tensor, "Tensor | None", "Tensor | None", float], tuple[Tensor, Tensor, Tensor]]


class _Scratch(threading.local):
    """One reusable buffer per thread for full-size temporaries on CPU.

    glibc hands large freed blocks back to the OS, so on CPU every fresh full-size tensor pays
    page faults on first touch (measured: four live 4 MB temporaries cost 6.5 ms instead of
    0.5 ms). Reusing one buffer for the temporaries that die inside an op avoids that; it costs one
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


_scratch = _Scratch()


class _Layout:
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


def _standard(stat: Tensor, shape: Sequence[int]) -> Tensor:
    """``stat`` holding ``(G, C)`` values, shaped ``(G, 1, C, 1...)`` for a grouped ``shape``."""
    return stat.reshape(shape[0], 1, shape[2], *([1] * (len(shape) - 3)))


@functools.lru_cache(maxsize=1024)
def _kernel_dims(
    shape: tuple[int, ...], stride: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """``(G, A, C, S)`` when a grouped tensor of this shape and stride has its elements in memory
    as a contiguous tensor of that shape, as the CPU kernels read them; else ``None``.

    "Rows" (``S == 1``, ``A`` = samples x spatial positions) when channels are innermost
    (tabular, channels-last); "planes" (``A`` = samples, ``S`` = spatial positions) when the
    tensor is contiguous. Decided from the tuples alone: it runs on every layer call.
    """
    groups, channels = shape[0], shape[2]
    for order in ((0, 1, *range(3, len(shape)), 2), tuple(range(len(shape)))):
        expected = 1
        for d in reversed(order):
            if shape[d] != 1 and stride[d] != expected:
                break
            expected *= shape[d]
        else:
            if order[-1] == 2:  # channels innermost
                return (groups, math.prod(shape) // (groups * channels), channels, 1)
            return (groups, shape[1], channels, math.prod(shape[3:]))
    return None


# (dy, x, weight, mean, rstd, input_grad, extra) -> (grad_x or None, dweight, dbias), where extra
# is what the Function's forward stored for its kernels in ctx.extra, and dweight = sum(dy * xhat)
# and dbias = sum(dy) over all samples, (C,) in the statistics dtype: the parameter gradients
# before their cast to the parameters' dtype.
BackwardKernels = Callable[
    [Tensor, Tensor, "Tensor | None", Tensor, Tensor, bool, Any],
    tuple["Tensor | None", Tensor, Tensor],
]


def _forward_outputs(
    ctx: Any,
    xg: Tensor,
    weight: Tensor | None,
    eps: float,
    stats: tuple[Tensor, ...],
    kernels: BackwardKernels,
    extra: Any,
) -> tuple[Tensor, Tensor]:
    """What every Function's forward ends with: save ``x``, ``weight``, ``eps`` and the
    per-group ``(mean, rstd)``, and the backward ``kernels`` with their ``extra`` argument, for
    backward; return ``(mean, var)`` in the standard shape, marked non-differentiable. ``stats``
    is ``(mean, rstd, var)`` in any shape holding ``(G, C)``."""
    mean, rstd, var = stats
    ctx.save_for_backward(xg, weight, mean, rstd)
    # mean and var are not differentiable: no zero gradients need to be made up for them.
    ctx.set_materialize_grads(False)
    ctx.kernels, ctx.extra, ctx.eps = kernels, extra, eps
    mean_s, var_s = _standard(mean, xg.shape), _standard(var, xg.shape)
    ctx.mark_non_differentiable(mean_s, var_s)
    return mean_s, var_s


def _param_grads(
    ctx: Any, weight: Tensor | None, dweight: Tensor, dbias: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias gradients from the kernels' ``(C,)`` totals, in the parameters' dtype."""
    if weight is None:
        return None, None
    dtype = weight.dtype

    def cast(total: Tensor) -> Tensor:
        # .to() would return a total already in this dtype too, but through a dispatch.
        return total if total.dtype == dtype else total.to(dtype)

    needs_w, needs_b = ctx.needs_input_grad[1:3]
    return (cast(dweight) if needs_w else None), (cast(dbias) if needs_b else None)


def _totals(sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
    """``(dweight, dbias)``: per-(group, channel) sums, in any shape holding ``(G, C)``, summed
    over the groups."""
    return sum_dy_xhat.sum(0).flatten(), sum_dy.sum(0).flatten()


class _FusedGhostNorm(torch.autograd.Function):
    """The backward every Function here shares: ``ctx.kernels`` (set by its forward through
    :func:`_forward_outputs`) give the input gradient and the two per-(group, channel) sums,
    which make the weight and bias gradients; under ``create_graph=True``, differentiable
    torch ops give them."""

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor | None, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        # One None per non-tensor input (eps, and the Triton Function's running update):
        # autograd drops trailing Nones beyond a Function's inputs.
        if dy is None:  # grads are not materialized, and only y is differentiable
            return None, None, None, None, None
        xg, weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the result must be differentiable
            grads = _math.differentiable_backward(dy, xg, weight, ctx.eps, ctx.needs_input_grad)
            return (*grads, None, None)
        dy = dy.view(*xg.shape)  # splitting dim 0 into (G, c): a view whatever the strides
        grad_x, dweight, dbias = ctx.kernels(
            dy, xg, weight, mean, rstd, ctx.needs_input_grad[0], ctx.extra
        )
        grad_w, grad_b = _param_grads(ctx, weight, dweight, dbias)
        return grad_x, grad_w, grad_b, None, None


class _TorchOpsGhostNorm(_FusedGhostNorm):
    """Ghost normalization in a few large torch ops; any device, float32/float64.

    Elementwise steps use plain ``mul``/``add`` with per-(group, channel) operands: on CPU they
    vectorize, whereas ``addcmul`` with broadcast operands runs ~4x slower.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        layout = _Layout(xg)
        x = layout.canon(xg)
        count = x.numel() // (layout.groups * layout.channels)
        mean = layout.group_sum(x) / count
        # Two-pass variance: sum((x - mean)^2) stays accurate when |mean| >> std, unlike
        # E[x^2] - mean^2. The centred buffer then becomes the output, in place.
        # The output must not be a view made inside the Function (in-place ops downstream, such
        # as ReLU(inplace=True), would be refused), so compute into a canonical view of it.
        flat = torch.empty_like(xg.flatten(0, 1))
        out = flat.view(xg.shape)  # internal only: the Function returns flat, not a view
        y = layout.canon(out)
        torch.sub(x, mean, out=y)
        var = layout.group_sum(torch.mul(y, y, out=_scratch.like(y))) / count
        rstd = torch.rsqrt(var + eps)
        if weight is None:
            y.mul_(rstd)
        else:
            y.mul_(rstd * layout.per_channel(weight)).add_(layout.per_channel(bias))  # type: ignore[arg-type]
        mean_s, var_s = _forward_outputs(
            ctx, xg, weight, eps, (mean, rstd, var), _torch_ops_backward, count
        )
        if y.data_ptr() != out.data_ptr():  # canon() had to copy (non-dense input)
            out.copy_(layout.uncanon(y))
        return flat, mean_s, var_s


def _torch_ops_backward(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    input_grad: bool, count: int,
) -> tuple[Tensor | None, Tensor, Tensor]:
    layout = _Layout(xg)
    x, g = layout.canon(xg), layout.canon(dy)
    sum_dy = layout.group_sum(g)
    buf = x - mean
    sum_dy_xhat = layout.group_sum(buf.mul_(g)) * rstd
    grad_x = None
    if input_grad:
        k = rstd if weight is None else rstd * layout.per_channel(weight)
        # dx = k * dy + b * x + c with per-(group, channel) b, c; built in the spent buffer.
        b = -k * rstd * sum_dy_xhat / count
        c = -k * sum_dy / count - b * mean
        torch.mul(x, b, out=buf).add_(c)
        grad_x = layout.uncanon(buf.add_(torch.mul(g, k, out=_scratch.like(g))))
    return (grad_x, *_totals(sum_dy, sum_dy_xhat))


def _torch_ops_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _TorchOpsGhostNorm.apply(xg, weight, bias, eps)  # type: ignore[no-any-return]


class _TritonGhostNorm(_FusedGhostNorm):
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
        update: _triton.RunningUpdate | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, rstd = _triton_forward(xg, weight, bias, eps, update)
        count = xg.numel() // (xg.shape[0] * xg.shape[2])
        mean_s, var_s = _forward_outputs(
            ctx, xg, weight, eps, (mean, rstd, var), _triton_backward, count
        )
        return y, mean_s, var_s


def _triton_forward(
    xg: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    update: _triton.RunningUpdate | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` from the kernels: ``y`` sample-first, laid out as ``xg``."""
    mean, var, rstd, scale, shift = _triton.forward_stats(xg, weight, bias, eps, update)
    y = torch.empty_like(xg.flatten(0, 1))
    _triton.normalize(xg, scale, shift, out=y.view(xg.shape))
    return y, mean, var, rstd


def _triton_backward(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    input_grad: bool, count: int,
) -> tuple[Tensor | None, Tensor, Tensor]:
    sum_dy, sum_dy_xhat, dbias, dweight = _triton.backward_sums(dy, xg, mean, rstd)
    grad_x = (
        _triton.backward_apply(dy, xg, mean, rstd, weight, sum_dy, sum_dy_xhat, count)
        if input_grad
        else None
    )
    return grad_x, dweight, dbias


def _triton_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _TritonGhostNorm.apply(xg, weight, bias, eps)  # type: ignore[no-any-return]


class _CpuKernelGhostNorm(_FusedGhostNorm):
    """Ghost normalization in the fused C kernels of :mod:`fxghost._cpu` (CPU, float32/float64,
    dense inputs): forward reads x twice and writes y once; backward reads x and dy twice and
    writes dx once, in cache-sized blocks so that each second read comes from cache."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        dims = _dense_dims(xg)
        out, mean, var, rstd = _cpu_forward(xg, weight, bias, eps, dims)
        mean_s, var_s = _forward_outputs(
            ctx, xg, weight, eps, (mean, rstd, var), _cpu_backward, dims
        )
        return out, mean_s, var_s


def _dense_dims(xg: Tensor) -> tuple[int, int, int, int]:
    dims = _kernel_dims(tuple(xg.shape), xg.stride())
    if dims is None:  # select() routes only dense inputs here
        raise ValueError(f"fxghost: the CPU kernels need a dense input, got strides {xg.stride()}")
    return dims


def _cpu_forward(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    dims: tuple[int, int, int, int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` from the C kernels: ``y`` sample-first, the statistics
    ``(G, C)``."""
    out = torch.empty_like(xg.flatten(0, 1))  # a dense input's strides: laid out as xg
    mean, var, rstd = _cpu.forward(xg, out, _as_param(weight, xg), _as_param(bias, xg), eps, dims)
    return out, mean, var, rstd


def _cpu_backward(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    input_grad: bool, dims: tuple[int, int, int, int],
) -> tuple[Tensor | None, Tensor, Tensor]:
    if dy.stride() != xg.stride():  # the incoming gradient may have any layout: bring it to x's
        dy = torch.empty_like(xg).copy_(dy)
    grad_x = torch.empty_like(xg) if input_grad else None
    dweight, dbias = _cpu.backward(dy, xg, _as_param(weight, xg), mean, rstd, grad_x, dims)
    return grad_x, dweight, dbias


def _as_param(p: Tensor | None, like: Tensor) -> Tensor | None:
    """A weight or bias as a contiguous vector in the input's dtype, as the C kernels read it."""
    if p is None or (p.dtype == like.dtype and p.is_contiguous()):
        return p  # only its data is read
    return p.detach().to(like.dtype).contiguous()


def _cpu_function_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _CpuKernelGhostNorm.apply(xg, weight, bias, eps)  # type: ignore[no-any-return]


def _cpu_kernel_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The C kernels in eager mode: through the C++ autograd op where it is built (the same
    kernels with the same arguments, without the Python around them), else the Function."""
    op = _cpu_autograd.op()
    if op is not None:
        return op(xg, weight, bias, eps)  # type: ignore[no-any-return]
    return _cpu_function_norm(xg, weight, bias, eps)


def training_norm(
    xg: Tensor, layer: nn.Module, requested: int, per_channel: int
) -> Tensor | None:
    """``y`` for a training batch of whole ghost batches ``xg`` (no tail) normalized by ``layer``
    as :func:`fxghost.ops.ghost_norm` does (``requested`` ghost batches asked for, ``per_channel``
    values per channel in each), with its running statistics and ``num_batches_tracked`` updated
    as :func:`fxghost._math.update_running_stats` does, by the normalization's own kernels:
    on CPU in one call of the C++ op (the C kernels, then the same C function as the update), on
    the Triton path in the launch that finishes the statistics. ``None``, with nothing done,
    where neither applies: under ``torch.compile``, where :func:`select` picks another
    implementation, without running statistics, with ``momentum=None``, or with buffers of
    another dtype or layout; the caller then takes the general path.

    The layer's most common call, with the least Python: made from Python, the update cost as
    much as the normalization on a CPU tabular layer, and on a GPU its small ops cost more CPU
    time than the kernels' GPU time. Every check here runs once per layer call.
    """
    momentum, running_mean, running_var = layer.momentum, layer.running_mean, layer.running_var
    if momentum is None or running_mean is None or not layer.track_running_stats:
        return None
    norm = select(xg)
    if norm is _triton_norm:
        nbt = layer.num_batches_tracked
        if (
            nbt is None
            or running_mean.dtype != torch.float32
            or running_var.dtype != torch.float32
            or running_mean.device != xg.device
            or not (running_mean.is_contiguous() and running_var.is_contiguous())
        ):
            return None
        weights, decay = _math.ema_coefficients(
            momentum, requested, xg.shape[0], torch.float32, xg.device
        )
        update = _triton.RunningUpdate(
            running_mean, running_var, nbt, weights, decay, _math.bessel(per_channel)
        )
        y, _, _ = _TritonGhostNorm.apply(xg, layer.weight, layer.bias, layer.eps, update)
        return y  # type: ignore[no-any-return]
    if norm is not _cpu_kernel_norm:
        return None
    op = _cpu_autograd.update_op()
    if (
        op is None
        or running_mean.dtype != xg.dtype
        or not _cpu.applies_to_running(running_mean, running_var)
    ):
        return None
    weights, decay = _math.ema_coefficients(
        momentum, requested, xg.shape[0], xg.dtype, xg.device
    )
    out = op(
        xg, layer.weight, layer.bias, layer.eps, running_mean, running_var,
        layer.num_batches_tracked, weights, decay, _math.bessel(per_channel),
    )
    return out[0]  # type: ignore[no-any-return]


def _on_dense(
    xg: Tensor,
    like: Callable[[Tensor], Tensor],
    run: Callable[[Tensor, tuple[int, int, int, int]], tuple[Any, ...]],
) -> tuple[Any, ...]:
    """``run(xg, dims)`` when the kernels can read ``xg`` as it is. Otherwise (compiled code may
    pass a layout its trace did not see) ``run`` on a contiguous copy, with the full-size first
    result copied into ``like(xg)``: the layout the custom op's fake implementation promised."""
    dims = _kernel_dims(tuple(xg.shape), xg.stride())
    if dims is not None:
        return run(xg, dims)
    dense = xg.contiguous()
    first, *rest = run(dense, _dense_dims(dense))
    return (like(xg).copy_(first), *rest)


_NORM_SCHEMA = (
    "(Tensor xg, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor xg, Tensor? weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)"
)


def _norm_fake(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, ...]:
    stats = [xg.new_empty((xg.shape[0], xg.shape[2]), dtype=_math.stat_dtype(xg.dtype))
             for _ in range(3)]
    return (torch.empty_like(xg.flatten(0, 1)), *stats)


def _norm_backward_fake(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    totals = [xg.new_empty((xg.shape[2],), dtype=_math.stat_dtype(xg.dtype)) for _ in range(2)]
    return torch.empty_like(xg), *totals


def _op_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    xg, weight, _bias, ctx.eps = inputs
    ctx.save_for_backward(xg, weight, output[1], output[3])


def _register_norm_ops(
    name: str,
    device_types: tuple[str, ...],
    forward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]],
    backward: Callable[..., tuple[Tensor, Tensor, Tensor]],
) -> Any:
    """Register ``fxghost::<name>`` (``(xg, weight, bias, eps) -> (y, mean, var, rstd)``, the
    statistics ``(G, C)``) and ``fxghost::<name>_backward`` (``(dy, xg, weight, mean, rstd) ->
    (grad_x, dweight, dbias)``, ``dy`` grouped like ``xg``) as custom ops with fake
    implementations and autograd: what torch.compile sees of the fused kernels. Returns the
    forward op."""
    fwd = torch.library.custom_op(
        f"fxghost::{name}", forward, mutates_args=(), device_types=device_types,
        schema=_NORM_SCHEMA,
    )
    fwd.register_fake(_norm_fake)
    bwd = torch.library.custom_op(
        f"fxghost::{name}_backward", backward, mutates_args=(), device_types=device_types,
        schema=_BACKWARD_SCHEMA,
    )
    bwd.register_fake(_norm_backward_fake)

    def backward_rule(
        ctx: Any, dy: Tensor, *_unused: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        xg, weight, mean, rstd = ctx.saved_tensors
        # create_graph=True: reached when dynamo runs the op without AOT autograd (whose traced
        # backward has grad mode off; AOT autograd refuses double backward).
        if torch.is_grad_enabled():
            return (*_math.differentiable_backward(dy, xg, weight, ctx.eps, ctx.needs_input_grad),
                    None)
        grad_x, dweight, dbias = bwd(dy.unflatten(0, xg.shape[:2]), xg, weight, mean, rstd)
        grad_w, grad_b = _param_grads(ctx, weight, dweight, dbias)
        return grad_x, grad_w, grad_b, None

    fwd.register_autograd(backward_rule, setup_context=_op_setup)
    return fwd


# Under torch.compile on CPU the C kernels run as custom ops for inputs with spatial dims: there
# inductor's code for the decomposition measured no faster than compiled chunked BatchNorm (NCHW,
# 0.9-1.1x) or slower (channels_last, 0.7x), the kernels 1.4-1.8x faster than chunked. On
# tabular (N, C) inputs inductor's code is as fast as the kernels and can fuse with the
# neighbouring Linear and ReLU, so those keep the decomposition. The eager path keeps the
# C++ autograd op (or the autograd.Function), which cost less per call than a Python custom op.
def _cpu_op_forward(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` as :func:`_cpu_forward` returns them."""
    return _on_dense(  # type: ignore[return-value]
        xg,
        lambda t: torch.empty_like(t.flatten(0, 1)),
        lambda t, dims: _cpu_forward(t, weight, bias, eps, dims),
    )


def _cpu_op_backward(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _on_dense(  # type: ignore[return-value]
        xg, torch.empty_like, lambda t, dims: _cpu_backward(dy, t, weight, mean, rstd, True, dims)
    )


_cpu_norm_op = _register_norm_ops("cpu_ghost_norm", ("cpu",), _cpu_op_forward, _cpu_op_backward)


def _cpu_op_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, var, _ = torch.ops.fxghost.cpu_ghost_norm(xg, weight, bias, eps)
    return y, _standard(mean, xg.shape), _standard(var, xg.shape)


# The Triton kernels as custom ops, for torch.compile on CUDA when FXGHOST_COMPILED_NORM=kernels
# (see _compiled_kernels_wanted). On the CPU they run only under the Triton interpreter (tests).
def _triton_dense(xg: Tensor) -> Tensor:
    # Compiled code may hand over a layout its trace did not see: the kernels take dense ones.
    return xg if _triton.supported(xg) else xg.contiguous()


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


_triton_norm_op = _register_norm_ops(
    "triton_ghost_norm", ("cuda", "cpu"), _triton_op_forward, _triton_op_backward
)


def _triton_op_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, var, _ = torch.ops.fxghost.triton_ghost_norm(xg, weight, bias, eps)
    return y, _standard(mean, xg.shape), _standard(var, xg.shape)


@torch.compiler.assume_constant_result
def _compiled_kernels_wanted() -> bool:
    """``FXGHOST_COMPILED_NORM=kernels``: under torch.compile on CUDA, the Triton kernels as
    opaque custom ops instead of the decomposition that inductor fuses with its neighbours."""
    return os.environ.get("FXGHOST_COMPILED_NORM", "decomposition") == "kernels"


@torch.compiler.assume_constant_result
def _triton_interpreting() -> bool:
    return _triton.interpreting()


@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    return _triton.triton is not None


def _dense_layout(xg: Tensor) -> bool:
    """Contiguous or channels innermost: decided from the layout, which may be symbolic."""
    return xg.is_contiguous() or xg.movedim(2, -1).is_contiguous()


def _triton_op_applies(xg: Tensor) -> bool:
    # The opt-in first: by default nothing else is traced (each check costs dynamo time per layer).
    return (
        _compiled_kernels_wanted()
        and (xg.device.type == "cuda" or (xg.device.type == "cpu" and _triton_interpreting()))
        and _triton_installed()
        and xg.dim() >= 3
        and xg.dtype in _triton._DTYPES
        and _dense_layout(xg)
    )


@torch.compiler.assume_constant_result
def _cpu_kernels_ready() -> bool:
    return _cpu.available()


def _cpu_op_applies(xg: Tensor) -> bool:
    """Whether the C kernels take ``xg`` (grouped, ``(G, c, C, *spatial)``) under torch.compile:
    decided from its dtype and layout, which may be symbolic, not from concrete strides."""
    return (
        xg.device.type == "cpu"
        and xg.dim() > 3
        and xg.dtype in (torch.float32, torch.float64)
        and _cpu_kernels_ready()
        and _dense_layout(xg)  # last: the only check that adds ops to the trace
    )


def _cpu_kernels_apply(xg: Tensor) -> bool:
    return (
        xg.dtype in (torch.float32, torch.float64)
        and _kernel_dims(tuple(xg.shape), xg.stride()) is not None
        and _cpu.available()
    )


def select(xg: Tensor) -> NormFn:
    """The implementation for this input.

    Under ``torch.compile``: on CPU the C kernels as custom ops for dense float32/float64
    inputs with spatial dims; with ``FXGHOST_COMPILED_NORM=kernels`` the Triton kernels as
    custom ops where they apply; else the decomposition with the analytic backward, for inductor
    to fuse with neighbouring ops (one composite op to dynamo, :mod:`fxghost._compile_ops`). In
    eager: the Triton kernels where they apply (CUDA, float32/16-bit, contiguous or channels-last
    layouts); on CPU the compiled C kernels for dense float32/float64 inputs; else the torch-ops
    Function for float32/float64, else the decomposition.
    """
    if torch.compiler.is_compiling():
        if _cpu_op_applies(xg):
            return _cpu_op_norm
        if _triton_op_applies(xg):
            return _triton_op_norm
        return _compile_ops.ghost_norm if _compile_ops.wanted() else _math.ghost_norm_compiled
    cpu = xg.is_cpu
    # On CPU the Triton kernels run only in the interpreter: asked first, as cheaply as possible.
    if (not cpu or _triton.interpreting()) and _triton.supported(xg):
        return _triton_norm
    if cpu and _cpu_kernels_apply(xg):
        return _cpu_kernel_norm
    if xg.dtype in (torch.float32, torch.float64):
        return _torch_ops_norm
    return _math.ghost_norm_decomposed
