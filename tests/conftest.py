"""Shared helpers: build a layer, run fxghost and the chunked reference side by side, compare."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

# make test runs the tests in pytest-xdist workers, one per core: each worker's torch takes its
# share of the cores, as two processes each with a thread per core would oversubscribe them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

#: Where run_side_by_side runs: FXGHOST_TEST_DEVICE=cuda checks the CUDA paths on a GPU machine.
DEVICE = torch.device(os.environ.get("FXGHOST_TEST_DEVICE", "cpu"))

# Per-dtype tolerances (rtol, atol) against a computation in the same dtype: float64 checks the
# algebra, float32 the numerics.
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
}

# 16-bit results are held to the float64 computation of the same thing rounded to their dtype:
# (units in the last place of the rounded value, absolute floor). Statistics in float32 then one
# rounding put a correct result within one ulp; a tolerance in relative terms as loose as the
# dtype's own precision would let through normalizing with the unbiased variance or accumulating
# statistics in 16 bits. The floor covers float32 cancellation in values near zero (input
# gradients), far below either of those errors.
ULP_TOL = {
    torch.float16: (2, 1e-5),
    torch.bfloat16: (2, 1e-5),
}

# Float32 tensors (running statistics, parameter gradients) of a step on 16-bit inputs, against
# float64 from the same 16-bit values: float32 accumulation, not the 16-bit input's precision.
STATS32_TOL = {"rtol": 1e-5, "atol": 1e-6}

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


def init_bn(bn: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``bn`` with non-trivial affine parameters (so their gradients mean something) and running
    statistics away from their defaults, those it has (a weight or bias may be None), in
    ``dtype`` (default: its own)."""
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
        if bn.bias is not None:
            bn.bias.uniform_(-0.5, 0.5)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.8, 1.2)
    return bn if dtype is None else bn.to(dtype)


def init_bns(net: nn.Module) -> nn.Module:
    """:func:`init_bn` on every BatchNorm of ``net``."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            init_bn(m)
    return net


def make_bn(kind: str, dtype: torch.dtype = torch.float64, **kwargs: object) -> nn.Module:
    cls, shape = BN_SHAPES[kind]
    return init_bn(cls(shape[0], **kwargs), dtype)


def conv_mlp() -> nn.Module:
    """Conv -> BatchNorm2d -> ReLU -> linear -> BatchNorm1d -> ReLU -> linear, for ``(N, 3, 5, 5)``
    inputs: both kinds of BatchNorm in one small net (the distributed tests' model)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def small_classifier() -> nn.Module:
    """A seeded conv -> BatchNorm -> ReLU -> pool -> linear classifier of 3-channel images into 10
    classes: the model the documentation's examples train."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


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
    if tol is None and expected.dtype in ULP_TOL:
        assert_ulp_close(actual, expected, what)
        return
    rtol, atol = TOL.get(expected.dtype, TOL[torch.float32])
    if tol is not None:
        rtol, atol = tol["rtol"], tol["atol"]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each of ``values`` (float64), subnormals included."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(values.double())
    spacing = torch.ldexp(torch.full_like(values, info.eps / 2, dtype=torch.float64), exponent)
    return spacing.clamp_min(info.eps * info.smallest_normal)


def ulp_error(
    actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, floor: float | None = None
) -> torch.Tensor:
    """Elementwise error of ``actual`` against ``exact`` rounded to ``dtype``, in ulps of that
    rounded value, after subtracting an absolute ``floor`` (default: ``ULP_TOL``'s). Non-finite
    values must match exactly (error 0 or inf)."""
    if floor is None:
        floor = ULP_TOL[dtype][1]
    rounded = exact.detach().to(dtype).double()
    got = actual.detach().double()
    same = (got == rounded) | (got.isnan() & rounded.isnan())
    err = ((got - rounded).abs() - floor).clamp_min(0) / ulp(rounded, dtype)
    return torch.where(same, torch.zeros_like(err), err.nan_to_num(nan=math.inf))


def assert_ulp_close(
    actual: torch.Tensor,
    exact: torch.Tensor,
    what: str,
    dtype: torch.dtype | None = None,
    floor: float | None = None,
) -> None:
    """``actual`` (a 16-bit result) is within ``ULP_TOL[dtype]`` of ``exact`` (the same thing
    computed in float64, or any dtype at least as precise) rounded to ``dtype`` (default:
    ``actual``'s); ``floor`` replaces ULP_TOL's absolute floor."""
    dtype = dtype or actual.dtype
    assert actual.shape == exact.shape, f"{what}: {tuple(actual.shape)} != {tuple(exact.shape)}"
    if not exact.numel():
        return
    err = ulp_error(actual, exact, dtype, floor).flatten()
    worst = int(err.argmax())
    allowed = ULP_TOL[dtype][0]
    got, want = actual.detach().flatten()[worst], exact.detach().flatten()[worst]
    assert float(err[worst]) <= allowed, (
        f"{what}: {float(err[worst]):.3g} ulps of {dtype} beyond the floor (allowed {allowed}): "
        f"got {float(got)!r}, the float64 value {float(want)!r} rounds to {float(want.to(dtype))!r}"
    )


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


class RecordGraphs:
    """A ``torch.compile`` backend: aot_eager, keeping AOT autograd's forward and backward graphs
    to read: ``torch._dynamo.testing.AotEagerAndRecordGraphs``, which torch 2.4 (the declared
    minimum) lacks."""

    def __init__(self) -> None:
        self.fw_graphs: list[torch.fx.GraphModule] = []
        self.bw_graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd

        def recorder(graphs: list[torch.fx.GraphModule]) -> Callable[..., Any]:
            def compiler(graph: torch.fx.GraphModule, _: list[torch.Tensor]) -> Any:
                graphs.append(graph)
                return make_boxed_func(graph.forward)

            return compiler

        # aot_eager's settings, with recording compilers.
        return aot_autograd(
            fw_compiler=recorder(self.fw_graphs),
            bw_compiler=recorder(self.bw_graphs),
            partition_fn=min_cut_rematerialization_partition,
            keep_inference_input_mutations=True,
        )(gm, inputs)


def run_checks_interpreted(test_file: str, timeout: int = 600) -> None:
    """Run ``test_file``'s ``check_*`` functions under the Triton interpreter, in a fresh process:
    ``TRITON_INTERPRET`` only takes effect when set before triton is imported. They must all run
    and pass."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q",
        "-p", "no:cacheprovider", "-o", "python_functions=check_*",
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]


def run_ranks(
    worker: Callable[..., None],
    args: tuple[Any, ...],
    world: int,
    names: Sequence[str],
    out_dir: Path,
    timeout_s: float,
    missing: dict[str, Any],
) -> dict[tuple[str, int], dict[str, Any]]:
    """Spawn ``world`` processes of ``worker(rank, *args)`` and return what each wrote for each
    scenario of ``names``, as ``out_dir/<name>.rank<rank>.json`` (``missing`` where nothing was
    written). A worker that hangs (one rank stuck in a collective) is killed after
    ``timeout_s`` and fails the test instead of blocking CI."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    # join() re-raises a worker's exception with its traceback (ProcessRaisedException).
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"workers did not finish within {timeout_s} s")
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for name in names:
        for rank in range(world):
            path = out_dir / f"{name}.rank{rank}.json"
            out[name, rank] = json.loads(path.read_text()) if path.exists() else dict(missing)
    return out


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
    backend: str = "auto",
) -> nn.Module:
    """Train steps then eval steps through fxghost and the reference; compare every step.

    float64 and float32 inputs are compared with the chunked reference in the same dtype
    (``TOL``). For float16/bfloat16 inputs the reference runs in float64 on the same values
    upcast, from the state fxghost's model holds before each step: outputs, input gradients
    and 16-bit state are held to that result rounded to their dtype (``ULP_TOL``), float32
    running statistics and gradients to float32 accuracy (``STATS32_TOL``).

    Returns the GraphModule so callers can make further checks.
    """
    model.to(device)
    exact = dtype in ULP_TOL
    reference_dtype = torch.float64 if exact else dtype
    compare = _ulp_or_stats32 if exact else assert_close
    reference = apply_chunked_ghost_batchnorm(
        copy.deepcopy(model).to(torch.float64) if exact else copy.deepcopy(model), ghost_batch_size
    )
    if transformed is None:
        transformed = fxghost.transform(model, ghost_batch_size, backend=backend)
    gm = transformed
    gen = torch.Generator().manual_seed(seed)
    steps = [(s, True) for s in train_shapes] + [(s, False) for s in eval_shapes]
    for i, (shape, training) in enumerate(steps):
        gm.train(training)
        reference.train(training)
        if exact:
            _copy_state(_unwrap(model), _unwrap(reference))
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
        if channels_last:
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        x = x.to(device=device, dtype=dtype)
        x_ref = x.detach().to(reference_dtype).clone().requires_grad_(training)
        x_gm = x.detach().clone().requires_grad_(training)
        y_ref = reference(x_ref)
        y_gm = gm(x_gm)
        what = f"step {i} ({'train' if training else 'eval'}, shape {shape})"
        assert y_gm.dtype == dtype and y_ref.dtype == reference_dtype, what
        compare(y_gm, y_ref, f"{what}: output")
        if channels_last:
            assert y_gm.is_contiguous(memory_format=fmt), f"{what}: output lost channels_last"
        if training:
            dy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64).to(device, dtype)
            y_ref.backward(dy.to(reference_dtype))
            y_gm.backward(dy)
            compare(x_gm.grad, x_ref.grad, f"{what}: input grad")
        if exact:
            _assert_state_exact(_unwrap(model), _unwrap(reference), what)
        else:
            assert_same_state(_unwrap(model), _unwrap(reference), what)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
    return gm


def _ulp_or_stats32(
    actual: torch.Tensor | None, exact: torch.Tensor | None, what: str, summed: bool = False
) -> None:
    """A tensor of a step on 16-bit inputs against its float64 computation: ULP_TOL for 16-bit
    tensors, STATS32_TOL for float32 ones. ``summed``: a 16-bit gradient that autograd
    accumulated in its dtype over several uses (a BatchNorm's weight, used once per group of
    ghost batches); each use's share was rounded, so the floor is one ulp at the tensor's
    largest value."""
    if exact is None or actual is None:
        assert actual is None and exact is None, what
    elif actual.dtype in ULP_TOL:
        floor = None
        if summed and exact.numel():
            floor = float(ulp(exact.detach().abs().max().reshape(1), actual.dtype)[0])
        assert_ulp_close(actual, exact, what, floor=floor)
    else:
        assert actual.dtype == torch.float32, f"{what}: {actual.dtype}"
        torch.testing.assert_close(
            actual.detach().double(),
            exact.detach().double(),
            **STATS32_TOL,
            msg=lambda m: f"{what}: {m}",
        )


def _assert_state_exact(model: nn.Module, exact: nn.Module, what: str) -> None:
    """Parameters, gradients and buffers of ``model`` against the float64 ``exact``."""
    for (name, pa), (_, pb) in zip(model.named_parameters(), exact.named_parameters(), strict=True):
        _ulp_or_stats32(pa, pb, f"{what}: parameter {name}")
        _ulp_or_stats32(pa.grad, pb.grad, f"{what}: grad of {name}", summed=True)
    for (name, ba), (_, bb) in zip(model.named_buffers(), exact.named_buffers(), strict=True):
        if ba.dtype == torch.long:
            assert torch.equal(ba, bb), f"{what}: buffer {name}: {ba} != {bb}"
        else:
            _ulp_or_stats32(ba, bb, f"{what}: buffer {name}")


def _copy_state(source: nn.Module, target: nn.Module) -> None:
    """Copy parameters and buffers (upcasting) between modules of the same structure."""
    with torch.no_grad():
        for a, b in zip(source.parameters(), target.parameters(), strict=True):
            b.copy_(a)
        for a, b in zip(source.buffers(), target.buffers(), strict=True):
            b.copy_(a)


def _unwrap(m: nn.Module) -> nn.Module:
    return m.bn if isinstance(m, fxghost.reference.ChunkedGhostBatchNorm) else m


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
