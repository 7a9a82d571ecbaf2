"""BatchNorm layers that lack their weight or their bias, as PyTorch accepts them, initialized as
conftest.init_bn initializes full ones (which needs both parameters)."""

from __future__ import annotations

import inspect

import torch
from conftest import init_bn
from torch import nn

#: How a layer comes to lack a parameter: ``BatchNorm(C, bias=False)`` (a weight only), or the
#: weight set to ``None`` after construction (``bn.weight = None``: a bias only).
MISSING = ("no_bias", "no_weight")


def without_bias(
    cls: type[nn.modules.batchnorm._BatchNorm], channels: int, **kwargs: object
) -> nn.Module:
    """``cls(channels, bias=False, **kwargs)``: a weight and no bias. BatchNorm in torch 2.11 and
    older takes no ``bias=``; there the same layer is made by setting its bias to ``None``."""
    if "bias" in inspect.signature(cls).parameters:
        return cls(channels, bias=False, **kwargs)  # type: ignore[arg-type]
    bn = cls(channels, **kwargs)  # type: ignore[arg-type]
    bn.bias = None  # type: ignore[assignment]
    return bn


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
        bn = without_bias(cls, channels, **kwargs)
    else:
        bn = cls(channels, **kwargs)  # type: ignore[arg-type]
        bn.weight = None  # type: ignore[assignment]
    return init_bn(bn, dtype)
