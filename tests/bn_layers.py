"""BatchNorm layers that lack their weight or their bias, as PyTorch accepts them, initialized as
conftest.init_bn initializes full ones (which needs both parameters)."""

from __future__ import annotations

import torch
from torch import nn

#: How a layer comes to lack a parameter: ``BatchNorm(C, bias=False)`` (a weight only), or the
#: weight set to ``None`` after construction (``bn.weight = None``: a bias only).
MISSING = ("no_bias", "no_weight")


def partial_bn(
    cls: type[nn.modules.batchnorm._BatchNorm],
    channels: int,
    missing: str,
    dtype: torch.dtype = torch.float64,
    **kwargs: object,
) -> nn.Module:
    """A ``cls(channels, **kwargs)`` without the parameter ``missing`` names, with the other and
    the running statistics away from their defaults, in ``dtype``."""
    if missing == "no_bias":
        bn = cls(channels, bias=False, **kwargs)  # type: ignore[arg-type]
    else:
        bn = cls(channels, **kwargs)  # type: ignore[arg-type]
        bn.weight = None  # type: ignore[assignment]
    return init_any(bn, dtype)


def init_any(bn: nn.Module, dtype: torch.dtype) -> nn.Module:
    """conftest.init_bn, for a layer with any of its parameters and running statistics."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.uniform_(-0.5, 0.5)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.8, 1.2)
    return bn.to(dtype)
