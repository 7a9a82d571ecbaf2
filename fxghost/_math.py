"""The ghost BatchNorm math, written once: statistics dtypes, the affine coefficients, the
differentiable backward, and the running-statistics update in closed form. The backends
(:mod:`fxghost.backends`) compute the normalization itself.

Tensors here are ghost-grouped views ``(G, c, C, *spatial)``: ``G`` ghost batches of ``c`` samples.
Statistics are per ``(group, channel)``, reduced over the samples and spatial positions, in float32
for 16-bit inputs (as PyTorch's BatchNorm does), float64 for float64. Normalization uses the biased
variance; running_var takes the unbiased one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "affine_coefficients",
    "bessel",
    "cast",
    "channel_shape",
    "cumulative_coefficients",
    "differentiable_backward",
    "ema_coefficients",
    "no_ghost_batch",
    "normalized",
    "reduce_dims",
    "scale_shift",
    "stat_dtype",
    "update_running_stats",
]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(ndim: int) -> list[int]:
    """The dims of a grouped view ``(G, c, C, *spatial)`` that statistics reduce over."""
    return [1, *range(3, ndim)]


def channel_shape(ndim: int, channels: int) -> list[int]:
    """Shape that broadcasts a per-channel vector against a grouped view."""
    return [1, 1, channels] + [1] * (ndim - 3)


def affine_coefficients(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``y = x * scale + shift`` for per-group statistics of shape ``(G, 1, C, 1...)``.

    Returns ``(rstd, scale, shift)`` in the statistics dtype.
    """
    rstd = torch.rsqrt(var + eps)
    return (rstd, *scale_shift(mean, rstd, weight, bias))


def scale_shift(
    mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``y = x * scale + shift``. Either parameter may be missing (``bias=False``, or one set to
    ``None``), as BatchNorm allows: then it is 1 or 0."""
    shape = channel_shape(mean.dim(), mean.shape[2])
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype).view(shape)
    if bias is None:
        return scale, -mean * scale
    return scale, bias.to(rstd.dtype).view(shape) - mean * scale


def differentiable_backward(
    dy: Tensor,
    xg: Tensor,
    weight: Tensor | None,
    eps: float | Tensor,
    needs_input_grad: Sequence[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x, dweight, dbias)`` of ghost normalization for the sample-first incoming
    gradient ``dy``, in differentiable ops: what the fused paths' backward returns under
    ``create_graph=True``, so that a second derivative (a gradient penalty, a Hessian-vector
    product) can go through it. The statistics are recomputed from ``xg`` rather than taken
    from the forward, where they were computed without autograd: the gradient depends on ``xg``
    through them too. ``needs_input_grad`` as a Function's ``ctx`` has it (x, weight, bias;
    False for a missing parameter). ``dweight`` and ``dbias`` are ``(C,)`` in the statistics
    dtype: the caller casts them to the parameters' (:func:`fxghost.backends._common.param_grads`
    does)."""
    dtype = stat_dtype(xg.dtype)
    dims = reduce_dims(xg.dim())
    xs = cast(xg, dtype)
    g = cast(dy.view(xg.shape), dtype)  # sample-first to grouped: a view
    var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (xs - mean) * rstd
    sum_dy = g.sum(dims, keepdim=True)
    sum_dy_xhat = (g * xhat).sum(dims, keepdim=True)
    grad_x = grad_w = grad_b = None
    if needs_input_grad[0]:
        count = xg.numel() // (xg.shape[0] * xg.shape[2])
        k = rstd
        if weight is not None:
            k = rstd * cast(weight, dtype).view(channel_shape(xg.dim(), xg.shape[2]))
        grad_x = cast(k * (g - sum_dy / count - xhat * (sum_dy_xhat / count)), xg.dtype)
    if needs_input_grad[1]:
        grad_w = sum_dy_xhat.sum(0).flatten()
    if needs_input_grad[2]:
        grad_b = sum_dy.sum(0).flatten()
    return grad_x, grad_w, grad_b


def no_ghost_batch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """The output for a batch ``x`` without samples (N=0), which forms no ghost batch: plain
    BatchNorm's, an empty batch of ``x``'s shape that depends on ``x``, the weight and the bias
    as BatchNorm's output does (so a backward through it works, and gives those zero
    gradients). Nothing is updated: no running statistics are passed."""
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Not t.to(dtype) when t already has it: traced by dynamo (torch 2.11), a Function whose
    # output came from such a no-op .to() got a constant zero gradient, silently.
    return t if t.dtype == dtype else t.to(dtype)


def normalized(xs: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``xs * scale + shift``, sample-first (``xs.flatten(0, 1)``'s shape)."""
    # Per-sample coefficients (small: N x C), so that y is computed sample-first and is not a view.
    groups, size = xs.shape[0], xs.shape[1]
    scale, shift = (t.expand(groups, size, *t.shape[2:]).flatten(0, 1) for t in (scale, shift))
    return xs.flatten(0, 1) * scale + shift


def _ema_weights(a: float, count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``a * (1 - a) ** (count - j)`` for ghost batch ``j = 1..count``: the weight of its
    statistics in the running statistics once all ``count`` updates are done."""
    later = torch.arange(count - 1, -1, -1, device=device, dtype=dtype)
    # The base as a 0-dim tensor, not a Python number: under torch.compile with dynamic shapes
    # ``a`` is a SymFloat, and inductor (torch 2.11) fails on pow(SymFloat, Tensor).
    base = torch.full((), 1.0 - a, device=device, dtype=dtype)
    return a * torch.pow(base, later)


# In eager mode the weights depend only on (momentum, batch shape): build them once, not per step.
_cached_ema_weights = functools.lru_cache(maxsize=256)(_ema_weights)


def ema_coefficients(
    momentum: float,
    requested: int,
    count: int,
    dtype: torch.dtype,
    device: torch.device,
    cached: bool = True,
) -> tuple[Tensor, float]:
    """``(weights, decay)`` such that ``count`` ghost-batch updates with momentum
    ``momentum / requested`` each leave ``R = decay * R0 + sum_j weights[j] * s_j``."""
    a = momentum / requested
    build = _cached_ema_weights if cached else _ema_weights
    return build(a, count, dtype, device), (1.0 - a) ** count


def cumulative_coefficients(
    seen: int, count: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, float]:
    """:func:`ema_coefficients` for ``momentum=None``, BatchNorm's cumulative average, after
    ``seen`` batches: ``count`` updates leave ``R = (seen R0 + sum_j s_j) / (seen + count)``."""
    total = seen + count
    return torch.full((count,), 1.0 / total, dtype=dtype, device=device), seen / total


#: ``(mean, var, weights, start, beta, unbias, running_mean, running_var) -> handled``: in place,
#: ``running = beta * running + sum_g weights[start + g] * stat[g]`` for the mean and for the
#: variance scaled by ``unbias``, over a group's ``(G, C)`` statistics.
Accumulate = Callable[[Tensor, Tensor, Tensor, int, float, float, Tensor, Tensor], bool]


def bessel(n: int) -> float:
    """Bessel's correction: the factor from the biased variance of ``n`` values to the unbiased
    one that BatchNorm keeps in ``running_var``."""
    return n / (n - 1)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    requested: int,
    groups: Sequence[tuple[Tensor, Tensor, int]],
    compiling: bool | None = None,
    accumulate: Accumulate | None = None,
) -> None:
    """Apply, in closed form and in place, the running-statistics updates that the ghost batches
    would make one after another through BatchNorm.

    ``groups`` holds ``(mean, biased_var, count)`` per group of equal-sized ghost batches, in batch
    order; ``mean`` and ``biased_var`` are ``(G, ..., C, ...)`` and ``count`` is the number of
    values per channel in each of its ghost batches.

    With momentum ``m`` every ghost batch updates with ``a = m / requested``, so after ``M`` of
    them ``R = (1-a)^M R0 + sum_j a (1-a)^(M-j) s_j``. With ``momentum=None`` BatchNorm keeps a
    cumulative average, ``R_t = R_{t-1} + (s_t - R_{t-1}) / t``, which telescopes to
    ``(t0 R0 + sum_j s_j) / (t0 + M)``.

    ``compiling`` (default: ``torch.compiler.is_compiling()``) keeps the weight cache out of a
    torch.compile trace. ``accumulate`` may do a group's weighted sums in one call (a backend's
    kernel: in eager mode the small torch ops cost more than the kernels of a tabular layer);
    it returns False where it does not apply.
    """
    channels = running_mean.shape[0]
    count = sum(m.numel() // channels for m, _, _ in groups)
    dtype = groups[0][0].dtype
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(
                "fxghost: momentum=None (cumulative average) needs num_batches_tracked; "
                "this BatchNorm has none"
            )
        means = torch.cat([m.reshape(-1, channels) for m, _, _ in groups])
        unbiased = torch.cat([v.reshape(-1, channels) * bessel(n) for _, v, n in groups])
        seen = num_batches_tracked.to(dtype)
        total = seen + count
        keep = seen / total
        new_mean = running_mean.to(dtype) * keep + means.sum(0) / total
        new_var = running_var.to(dtype) * keep + unbiased.sum(0) / total
    else:
        if compiling is None:
            compiling = torch.compiler.is_compiling()
        weights, decay = ema_coefficients(
            momentum, requested, count, dtype, groups[0][0].device, cached=not compiling
        )
        # The buffers themselves when already in the statistics dtype (the usual case): the
        # update is then in place. (Checked here: .to() returns self too, through a dispatch.)
        new_mean = running_mean if running_mean.dtype == dtype else running_mean.to(dtype)
        new_var = running_var if running_var.dtype == dtype else running_var.to(dtype)
        start, beta = 0, decay
        for mean, var, n in groups:
            k = mean.numel() // channels
            if accumulate is None or not accumulate(
                mean, var, weights, start, beta, bessel(n), new_mean, new_var
            ):
                w = weights[start : start + k]
                # One matrix-vector product per statistic: the weighted sum over ghost batches.
                new_mean.addmv_(mean.reshape(k, channels).t(), w, beta=beta)
                new_var.addmv_(var.reshape(k, channels).t(), w, beta=beta, alpha=bessel(n))
            start, beta = start + k, 1.0
    if new_mean is not running_mean:
        running_mean.copy_(new_mean)
    if new_var is not running_var:
        running_var.copy_(new_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(count)
