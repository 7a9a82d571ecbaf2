"""Shared helpers: build a layer, run fxghost and the chunked reference side by side, compare."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

#: Where run_side_by_side runs: FXGHOST_TEST_DEVICE=cuda checks the CUDA paths on a GPU machine.
DEVICE = torch.device(os.environ.get("FXGHOST_TEST_DEVICE", "cpu"))

# Per-dtype tolerances (rtol, atol): float64 checks the algebra, float32 the numerics.
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

BN_SHAPES = {
    "1d_NC": (nn.BatchNorm1d, (5,)),
    "1d_NCL": (nn.BatchNorm1d, (5, 7)),
    "2d": (nn.BatchNorm2d, (4, 5, 3)),
    "3d": (nn.BatchNorm3d, (3, 2, 3, 2)),
}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Single-threaded, for modules of small tensors (``pytestmark = usefixtures("one_thread")``):
    with small inputs every op is short, and each OpenMP parallel region then costs more than it
    saves; on a shared 2-core machine, where the second thread is often descheduled, one
    BatchNorm call took 25 ms instead of 0.3 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def init_bn(bn: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``bn`` with non-trivial affine parameters (so their gradients mean something) and running
    statistics away from their defaults, in ``dtype``."""
    with torch.no_grad():
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if bn.track_running_stats:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.8, 1.2)
    return bn.to(dtype)


def make_bn(kind: str, dtype: torch.dtype = torch.float64, **kwargs: object) -> nn.Module:
    cls, shape = BN_SHAPES[kind]
    return init_bn(cls(shape[0], **kwargs), dtype)


class ConstantNet(nn.Module):
    """A forward that creates a tensor: tracing stores it as a ``_tensor_constant`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + torch.arange(3.0)


def input_shape(kind: str, n: int) -> tuple[int, ...]:
    return (n, *BN_SHAPES[kind][1])


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    what: str,
    tol: dict[str, float] | None = None,
) -> None:
    if expected is None:
        assert actual is None, what
        return
    assert actual is not None, what
    rtol, atol = TOL.get(expected.dtype, TOL[torch.float32])
    if tol is not None:
        rtol, atol = tol["rtol"], tol["atol"]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same_state(
    a: nn.Module, b: nn.Module, what: str, tol: dict[str, float] | None = None
) -> None:
    """Parameters, gradients and buffers of two modules with the same structure are equal."""
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(pa, pb, f"{what}: parameter {name}", tol)
        assert_close(pa.grad, pb.grad, f"{what}: grad of {name}", tol)
    for (name, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        if ba.dtype == torch.long:
            assert torch.equal(ba, bb), f"{what}: buffer {name}: {ba} != {bb}"
        else:
            assert_close(ba, bb, f"{what}: buffer {name}", tol)


def assert_state_scaled(a: nn.Module, b: nn.Module, what: str, rel: float) -> None:
    """Like :func:`assert_same_state`, each tensor compared relative to its own scale (its
    largest value): float64 through deep models with few values per channel is ill-conditioned,
    so a small gradient's absolute rounding can be far above a fixed atol while being ~1e-12 of
    its tensor. A gradient that is zero in exact arithmetic (the bias of a BatchNorm whose
    output another normalization follows) is rounding noise on every element: those are held
    to ``1e-4 * rel`` times the largest gradient of the model instead, and so are running means
    that are zero in exact arithmetic (of a normalized input), against the largest buffer."""
    pairs = list(zip(a.named_parameters(), b.named_parameters(), strict=True))
    buffers = list(zip(a.named_buffers(), b.named_buffers(), strict=True))

    def floor(tensors: list[torch.Tensor]) -> float:
        return rel * 1e-4 * max((float(t.detach().abs().max()) for t in tensors), default=0.0)

    grad_floor = floor([pb.grad for _, (_, pb) in pairs if pb.grad is not None])
    buffer_floor = floor([bb for _, (_, bb) in buffers if bb.is_floating_point() and bb.numel()])

    def check(x: torch.Tensor | None, y: torch.Tensor | None, name: str, atol: float) -> None:
        assert (x is None) == (y is None), f"{what}: {name}"
        if x is None or y is None:
            return
        if y.dtype == torch.long:
            assert torch.equal(x, y), f"{what}: {name}: {x} != {y}"
            return
        x, y = x.detach(), y.detach()
        scale = float(y.abs().max()) if y.numel() else 0.0
        err = float((x - y).abs().max()) if y.numel() else 0.0
        assert err <= rel * scale + atol, f"{what}: {name}: error {err:.3g}, scale {scale:.3g}"

    for (name, pa), (_, pb) in pairs:
        check(pa, pb, f"parameter {name}", 0.0)
        check(pa.grad, pb.grad, f"grad of {name}", grad_floor)
    for (name, ba), (_, bb) in buffers:
        check(ba, bb, f"buffer {name}", buffer_floor)


def run_side_by_side(
    model: nn.Module,
    ghost_batch_size: int,
    train_shapes: Sequence[tuple[int, ...]],
    eval_shapes: Sequence[tuple[int, ...]] = (),
    *,
    dtype: torch.dtype = torch.float64,
    channels_last: bool = False,
    seed: int = 0,
    transformed: torch.nn.Module | None = None,
    device: torch.device = DEVICE,
) -> nn.Module:
    """Train steps then eval steps through fxghost and the reference; compare every step.

    Returns the GraphModule so callers can make further checks.
    """
    model.to(device)
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), ghost_batch_size)
    gm = transformed if transformed is not None else fxghost.transform(model, ghost_batch_size)
    gen = torch.Generator().manual_seed(seed)
    steps = [(s, True) for s in train_shapes] + [(s, False) for s in eval_shapes]
    for i, (shape, training) in enumerate(steps):
        gm.train(training)
        reference.train(training)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
        if channels_last:
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        x = x.to(device=device, dtype=dtype)
        x_ref = x.detach().clone().requires_grad_(training)
        x_gm = x.detach().clone().requires_grad_(training)
        y_ref = reference(x_ref)
        y_gm = gm(x_gm)
        what = f"step {i} ({'train' if training else 'eval'}, shape {shape})"
        assert y_gm.dtype == y_ref.dtype, what
        assert_close(y_gm, y_ref, f"{what}: output")
        if channels_last:
            assert y_gm.is_contiguous(memory_format=fmt), f"{what}: output lost channels_last"
        if training:
            dy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64).to(device, dtype)
            y_ref.backward(dy)
            y_gm.backward(dy)
            assert_close(x_gm.grad, x_ref.grad, f"{what}: input grad")
        assert_same_state(_unwrap(model), _unwrap(reference), what)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
    return gm


def _unwrap(m: nn.Module) -> nn.Module:
    return m.bn if isinstance(m, fxghost.reference.ChunkedGhostBatchNorm) else m


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
