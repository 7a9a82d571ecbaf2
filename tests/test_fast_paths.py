"""Each ghost-normalization implementation against the decomposition and numerical gradients."""

from __future__ import annotations

import pytest
import torch

from fxghost import _fast, _math

GROUPED = {
    "tabular": (3, 4, 5),
    "ncl": (2, 3, 4, 6),
    "nchw": (2, 3, 4, 5, 3),
    "ncdhw": (2, 2, 3, 2, 3, 2),
}


def _grouped(name: str, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    shape = GROUPED[name]
    n = shape[0] * shape[1]
    x = torch.randn(n, *shape[2:], dtype=torch.float64) * 3 + 5  # a large mean tests the variance
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.to(dtype).unflatten(0, shape[:2])


CASES = [(n, False) for n in GROUPED] + [("nchw", True), ("ncdhw", True)]


@pytest.mark.parametrize(("name", "channels_last"), CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_torch_ops_function_gradcheck(name: str, channels_last: bool, affine: bool) -> None:
    xg = _grouped(name, channels_last, torch.float64).requires_grad_()
    channels = xg.shape[2]
    w = torch.rand(channels, dtype=torch.float64, requires_grad=affine) + 0.5 if affine else None
    b = torch.randn(channels, dtype=torch.float64, requires_grad=affine) if affine else None

    def f(*args: torch.Tensor) -> torch.Tensor:
        return _fast._torch_ops_norm(args[0], *(args[1:] if affine else (None, None)), 1e-5)[0]

    inputs = (xg, w, b) if affine else (xg,)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize(("name", "channels_last"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_ops_function_matches_decomposition(
    name: str, channels_last: bool, dtype: torch.dtype
) -> None:
    xg = _grouped(name, channels_last, dtype)
    channels = xg.shape[2]
    w = (torch.rand(channels) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(channels).to(dtype).requires_grad_()
    dy = torch.randn(xg.shape, dtype=dtype)
    results = []
    for fn in (_fast._torch_ops_norm, _math.ghost_norm_decomposed):
        x = xg.detach().clone().requires_grad_()
        y, mean, var = fn(x, w, b, 1e-5)
        (y * dy).sum().backward()
        results.append((y, mean, var, x.grad, w.grad.clone(), b.grad.clone(), y.stride()))
        w.grad = b.grad = None
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for got, want in zip(results[0][:6], results[1][:6], strict=True):
        torch.testing.assert_close(got, want, **tol)
    assert results[0][6] == xg.stride(), "output layout differs from the input's"


def test_select_routes_by_dtype_and_compile() -> None:
    assert _fast.select(torch.zeros(1, 2, 3)) is _fast._torch_ops_norm
    assert _fast.select(torch.zeros(1, 2, 3, dtype=torch.bfloat16)) is _math.ghost_norm_decomposed
