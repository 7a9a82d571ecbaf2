"""The ghost BatchNorm math, written once.

Tensors here are ghost-grouped views ``(G, c, C, *spatial)``: ``G`` ghost batches of ``c`` samples.
Statistics are per ``(group, channel)``, reduced over the samples and spatial positions, in float32
for 16-bit inputs (as PyTorch's BatchNorm does), float64 for float64. Normalization uses the biased
variance; running_var takes the unbiased one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _cpu

__all__ = [
    "affine_coefficients",
    "bessel",
    "ema_coefficients",
    "ghost_norm_decomposed",
    "reduce_dims",
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
    if weight is None:
        scale = rstd
        shift = -mean * rstd
    else:
        shape = channel_shape(mean.dim(), mean.shape[2])
        scale = rstd * weight.to(rstd.dtype).view(shape)
        shift = bias.to(rstd.dtype).view(shape) - mean * scale  # type: ignore[union-attr]
    return rstd, scale, shift


def ghost_norm_decomposed(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost-normalize ``xg`` in plain differentiable ops.

    This is the formulation inductor sees under ``torch.compile`` (it fuses it with neighbouring
    ops), except for CPU inputs with spatial dims, and the fallback where no fused path applies.
    Returns ``(y, mean, var)``: ``y`` in the input dtype and layout, sample-first
    (``xg.flatten(0, 1)``'s shape), ``mean`` and biased ``var`` of shape ``(G, 1, C, 1...)``.
    """
    xs = xg.to(stat_dtype(xg.dtype))
    var, mean = torch.var_mean(xs, dim=reduce_dims(xg.dim()), correction=0, keepdim=True)
    _, scale, shift = affine_coefficients(mean, var, weight, bias, eps)
    # Per-sample coefficients (small: N x C), so that y is computed sample-first and is not a view.
    groups, size = xg.shape[0], xg.shape[1]
    scale, shift = (t.expand(groups, size, *t.shape[2:]).flatten(0, 1) for t in (scale, shift))
    y = xs.flatten(0, 1) * scale + shift
    return y.to(xg.dtype), mean, var


def _ema_weights(a: float, count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``a * (1 - a) ** (count - j)`` for ghost batch ``j = 1..count``: the weight of its
    statistics in the running statistics once all ``count`` updates are done."""
    later = torch.arange(count - 1, -1, -1, device=device, dtype=dtype)
    return a * torch.pow(1.0 - a, later)


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
            if not compiling and _cpu.applies_to_running(mean, var, weights, new_mean, new_var):
                # The same sums in one C call: in eager these small ops cost more than the
                # kernels of a tabular layer.
                _cpu.running_update(mean, var, weights, start, beta, bessel(n), new_mean, new_var)
            else:
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
