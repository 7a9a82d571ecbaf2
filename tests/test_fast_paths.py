"""Each ghost-normalization implementation against the decomposition and numerical gradients."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from conftest import run_side_by_side

from fxghost import _math, backends
from fxghost.backends import _build, cpu, torch_ops
from fxghost.backends._common import NormParams
from fxghost.backends._dims import dims
from fxghost.backends._fused import NormFn

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernels = pytest.mark.skipif(
    not cpu.available(), reason="no C compiler: the CPU kernels are not built here"
)
needs_op = pytest.mark.skipif(
    not cpu.op_available(),
    reason="no C++ compiler or torch headers: the CPU autograd op is not built here",
)


def _autograd_op_norm(
    xg: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpu.cpp_ops().eager_cpu_ghost_norm.default(xg, w, b, eps, dims(xg))  # type: ignore[no-any-return]


def _cpu_function_norm(
    xg: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpu.CpuKernelGhostNorm.run(xg, NormParams(w, b, eps))


def _torch_ops_norm(
    xg: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch_ops.TorchOpsGhostNorm.run(xg, NormParams(w, b, eps))


# The eager CPU paths: the C kernels through the C++ autograd op and through the Python Function
# (where the op cannot be built), and the torch-ops fallback used without a compiler.
CPU_IMPLS = [
    pytest.param(_autograd_op_norm, id="cpu_autograd_op", marks=needs_op),
    pytest.param(_cpu_function_norm, id="cpu_function", marks=needs_kernels),
    pytest.param(_torch_ops_norm, id="torch_ops"),
]

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
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x.to(dtype).unflatten(0, shape[:2])


CASES = [(n, False) for n in GROUPED] + [("nchw", True), ("ncdhw", True)]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(("name", "channels_last"), CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_cpu_function_gradcheck(impl: NormFn, name: str, channels_last: bool, affine: bool) -> None:
    xg = _grouped(name, channels_last, torch.float64).requires_grad_()
    channels = xg.shape[2]
    w = torch.rand(channels, dtype=torch.float64, requires_grad=affine) + 0.5 if affine else None
    b = torch.randn(channels, dtype=torch.float64, requires_grad=affine) if affine else None

    def f(*args: torch.Tensor) -> torch.Tensor:
        return impl(args[0], *(args[1:] if affine else (None, None)), 1e-5)[0]

    inputs = (xg, w, b) if affine else (xg,)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(("name", "channels_last"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_function_matches_decomposition(
    impl: NormFn, name: str, channels_last: bool, dtype: torch.dtype
) -> None:
    xg = _grouped(name, channels_last, dtype)
    channels = xg.shape[2]
    w = (torch.rand(channels) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(channels).to(dtype).requires_grad_()
    dy = torch.randn(xg.flatten(0, 1).shape, dtype=dtype)  # outputs are sample-first
    results = []
    for fn in (impl, torch_ops.ghost_norm_decomposed):
        x = xg.detach().clone().requires_grad_()
        y, mean, var = fn(x, w, b, 1e-5)
        (y * dy).sum().backward()
        results.append((y, mean, var, x.grad, w.grad.clone(), b.grad.clone(), y.stride()))
        w.grad = b.grad = None
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for got, want in zip(results[0][:6], results[1][:6], strict=True):
        torch.testing.assert_close(got, want, **tol)
    assert results[0][6] == xg.flatten(0, 1).stride(), "output layout differs from the input's"
    assert results[0][0]._base is None, "the output is a view: in-place ops on it would cost"


@needs_kernels
@pytest.mark.parametrize("groups", [1, 3, 8])
@pytest.mark.parametrize(
    ("shape", "channels_last"), [((16, 24), False), ((6, 5, 7, 9), False), ((6, 5, 7, 9), True)]
)
def test_cpu_kernels_split_between_threads(
    monkeypatch: pytest.MonkeyPatch, groups: int, shape: tuple[int, ...], channels_last: bool
) -> None:
    """Work is split by groups, or by channels when there are fewer groups than threads (a
    tail group): every split gives the single-thread result."""
    x = torch.randn(groups * shape[0], *shape[1:], dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xg = x.unflatten(0, (groups, shape[0]))
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64)
    dy = torch.randn(xg.flatten(0, 1).shape, dtype=torch.float64)

    def run(threads: int) -> list[torch.Tensor]:
        monkeypatch.setattr(cpu, "_threads", lambda numel: threads)
        x = xg.detach().clone().requires_grad_()
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        y, mean, var = _cpu_function_norm(x, wi, bi, 1e-5)
        y.backward(dy)
        return [y, mean, var, x.grad, wi.grad, bi.grad]

    single = run(1)
    for threads in (2, 3, 5):
        for got, want in zip(run(threads), single, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# Shapes past the kernels' 128 KB cache blocks: several channel blocks per group, the last one
# smaller (64 channels of 256 positions, or 64 of 2049), row blocks merged with Chan's formula
# (600 rows of 100 channels), and one channel per block with long rows (8000 positions).
BLOCKED = [(2, 3, 64, 256), (3, 2, 64, 2049), (2, 600, 100), (2, 3, 5, 8000)]
# Past the 8 MB from which y and dx are written with non-temporal stores, with rows and segments
# that start off the 32-byte boundary the vector stores need: 250 channels of one position, and
# 67 channels of 1001 positions. Sized for float64; float32 takes twice the samples.
STREAMED = [(4, 1100, 250), (2, 8, 67, 1001)]


@needs_kernels
@pytest.mark.parametrize("shape", BLOCKED + STREAMED, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernels_blocked_shapes_match_decomposition(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], dtype: torch.dtype, threads: int
) -> None:
    monkeypatch.setattr(cpu, "_threads", lambda numel: threads)
    if shape in STREAMED and dtype == torch.float32:
        shape = (shape[0], 2 * shape[1], *shape[2:])
    torch.manual_seed(0)
    xg = (torch.randn(shape, dtype=torch.float64) * 3 + 5).to(dtype)
    w = (torch.rand(shape[2]) + 0.5).to(dtype)
    b = torch.randn(shape[2]).to(dtype)
    dy = torch.randn(xg.flatten(0, 1).shape).to(dtype)
    results = []
    # The Function, whose thread count is patched; the op runs the same kernels (checked below).
    for fn in (_cpu_function_norm, torch_ops.ghost_norm_decomposed):
        x, wi, bi = (t.clone().requires_grad_() for t in (xg, w, b))
        y, mean, var = fn(x, wi, bi, 1e-5)
        y.backward(dy)
        results.append((y, mean, var, x.grad, wi.grad, bi.grad))
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    names = ("y", "mean", "var", "grad x", "grad w", "grad b")
    for name, got, want in zip(names, *results, strict=True):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", CPU_IMPLS[:2])
def test_cpu_kernels_take_any_gradient_layout(impl: NormFn) -> None:
    """The incoming gradient may be laid out unlike x (here: transposed storage)."""
    xg = _grouped("nchw", False, torch.float64)
    w = torch.rand(xg.shape[2], dtype=torch.float64) + 0.5
    b = torch.randn(xg.shape[2], dtype=torch.float64)
    flat = xg.flatten(0, 1).shape
    dy = torch.randn(tuple(reversed(flat)), dtype=torch.float64).permute(3, 2, 1, 0)
    grads = []
    for fn in (impl, torch_ops.ghost_norm_decomposed):
        x = xg.detach().clone().requires_grad_()
        fn(x, w, b, 1e-5)[0].backward(dy)
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


# (grouped shape, channels_last): small, and past the kernels' parallel and streaming sizes.
OP_SHAPES = [
    ((3, 4, 5), False),
    ((2, 3, 4, 5, 3), False),
    ((2, 3, 4, 5, 3), True),
    ((2, 2, 3, 2, 3, 2), True),
    ((4, 64, 300), False),
    ((2, 8, 67, 1001), False),
]


@needs_op
@pytest.mark.parametrize(("shape", "channels_last"), OP_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "params", ["affine", "none", "other_dtype", "frozen"], ids=lambda v: f"params={v}"
)
def test_autograd_op_is_the_function_bit_for_bit(
    shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype, params: str
) -> None:
    """The C++ op and the Python Function run the same kernels with the same arguments: every
    output and gradient is identical, with or without affine parameters, with parameters in
    another dtype (cast for the kernels, gradients returned in theirs), and with parameters or
    input that need no gradient."""
    torch.manual_seed(0)
    x = torch.randn(shape[0] * shape[1], *shape[2:], dtype=torch.float64) * 3 + 5
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    xg = x.to(dtype).unflatten(0, shape[:2])
    other = torch.float32 if dtype == torch.float64 else torch.float64
    pdtype = other if params == "other_dtype" else dtype
    w = (torch.rand(shape[2]) + 0.5).to(pdtype)
    b = torch.randn(shape[2]).to(pdtype)
    dy = torch.randn(xg.flatten(0, 1).shape).to(dtype)
    results = []
    for fn in (_autograd_op_norm, _cpu_function_norm):
        xi = xg.clone().requires_grad_(params != "frozen")
        wi, bi = (t.clone().requires_grad_(params != "frozen") for t in (w, b))
        if params == "frozen":
            wi.requires_grad_()  # only the weight needs a gradient
        y, mean, var = fn(xi, *((None, None) if params == "none" else (wi, bi)), 1e-5)
        if y.requires_grad:
            y.backward(dy)
        results.append([y, mean, var, xi.grad, wi.grad, bi.grad])
    names = ("y", "mean", "var", "grad x", "grad w", "grad b")
    for name, got, want in zip(names, *results, strict=True):
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == want.dtype and got.stride() == want.stride(), name
            assert torch.equal(got, want), name
    if params == "frozen":
        assert results[0][4] is not None and results[0][5] is None


class _KeepGradView(torch.autograd.Function):
    """Identity whose backward passes on a view of a larger tensor that it keeps."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, kept: list) -> torch.Tensor:  # type: ignore[override]
        ctx.kept = kept
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.kept.append(torch.cat([g, g]))
        return ctx.kept[0][: len(g)], None


def _op_backward(impl: NormFn, shape: tuple[int, ...], dtype: torch.dtype, how: str) -> dict:
    """One step of ``impl`` on x of ``shape`` in two ghost batches, with the gradient reaching it
    made as ``how`` says. Returns the gradients, what the caller kept, and how many bytes the
    op's backward node left allocated (the profiler's memory accounting)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype).requires_grad_()
    w = (torch.rand(shape[1]) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(shape[1]).to(dtype).requires_grad_()
    y = impl(x.unflatten(0, (2, shape[0] // 2)), w, b, 1e-5)[0]
    weights = torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)
    out: dict = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if how == "unique":  # relu's gradient, made for the op alone
            (torch.relu(y) * weights).sum().backward()
        elif how == "caller":  # the caller passes dy and keeps it
            out["dy"], out["dy_before"] = weights.clone(), weights.clone()
            y.backward(out["dy"])
        elif how == "retained":  # y.grad keeps the incoming gradient
            y.retain_grad()
            (torch.relu(y) * weights).sum().backward()
            out["y_grad"], out["y_grad_want"] = y.grad, weights * (y.detach() > 0)
        elif how == "slice":  # a slice of cat's gradient: dx would keep all its memory alive
            (torch.cat([y, y.detach()]) * torch.cat([weights, weights])).sum().backward()
        elif how == "kept_view":  # a view of a tensor that something else keeps
            kept: list[torch.Tensor] = []
            (_KeepGradView.apply(y, kept) * weights).sum().backward()
            out["y_grad"], out["y_grad_want"] = kept[0][: len(y)], weights
    node = [e for e in prof.key_averages() if "GhostNorm" in e.key]
    out["allocated"] = max((e.cpu_memory_usage for e in node), default=None)
    out["grads"] = (x.grad, w.grad, b.grad)
    return out


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(8, 6), (6, 5, 7, 9)], ids=str)
def test_autograd_op_writes_dx_over_a_spent_gradient(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """When nothing else holds the incoming gradient, the op writes dx over it (its backward
    allocates no activation-sized tensor) with the values of a fresh dx. What the caller keeps is
    left alone: its dy, y.grad (retain_grad), a larger tensor the gradient is a view of; and a
    slice of a larger gradient is not reused either (dx would keep all of it alive). Gradients
    match the Function's."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    spent = _op_backward(_autograd_op_norm, shape, dtype, "unique")
    assert spent["allocated"] is not None and spent["allocated"] < size // 2
    fresh = _op_backward(_cpu_function_norm, shape, dtype, "unique")
    for got, want in zip(spent["grads"], fresh["grads"], strict=True):
        assert torch.equal(got, want)
    for how in ("caller", "retained", "slice", "kept_view"):
        kept = _op_backward(_autograd_op_norm, shape, dtype, how)
        if how in ("caller", "kept_view"):  # the incoming gradient outlives the node
            assert kept["allocated"] >= size, how
        if how == "slice":  # x.grad does not keep cat's whole gradient alive
            assert kept["grads"][0].untyped_storage().nbytes() == size
        fresh = _op_backward(_cpu_function_norm, shape, dtype, how)
        for got, want in zip(kept["grads"], fresh["grads"], strict=True):
            assert torch.equal(got, want), how
        if how == "caller":
            assert torch.equal(kept["dy"], kept["dy_before"]), "the caller's dy was overwritten"
        if how in ("retained", "kept_view"):
            kept_intact = torch.equal(kept["y_grad"], kept["y_grad_want"])
            assert kept_intact, "a kept gradient was overwritten"


def _update(bn: torch.nn.Module, xg: torch.Tensor) -> backends.RunningStatsUpdate:
    """``bn``'s running-statistics update for a training batch of the ghost batches ``xg``."""
    return backends.RunningStatsUpdate(
        bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, xg.shape[0]
    )


def _tracked_step(fused: bool, xg: torch.Tensor, bn: torch.nn.Module) -> list:
    """One training step of ``bn`` on ``xg``, ghost batches of ``xg.shape[1]`` samples: the op
    with the update fused, or the op and then the Python update. Returns y, the gradients and
    the buffers afterwards."""
    x = xg.detach().clone().requires_grad_()
    n = x.numel() // (x.shape[0] * x.shape[2])  # values per channel in each ghost batch
    if fused:
        y = cpu.EAGER.norm(x, NormParams(bn.weight, bn.bias, bn.eps), _update(bn, x))[0]
        assert "fxghost::GhostNorm" in y.grad_fn.name()
    else:
        y, mean, var = _autograd_op_norm(x, bn.weight, bn.bias, bn.eps)
        cpu.EAGER.update_running_stats(_update(bn, x), [(mean, var, n)])
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape))
    return [y, x.grad, bn.weight.grad, bn.bias.grad, *(t.clone() for t in bn.buffers())]


def _bn_for(xg: torch.Tensor, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = {3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm1d, 5: torch.nn.BatchNorm2d}
    bn = cls.get(xg.dim(), torch.nn.BatchNorm3d)(xg.shape[2], **kwargs).to(xg.dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_var.uniform_(1, 2)
    return bn


@needs_op
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "channels_last"), CASES)
def test_fused_running_update_is_the_python_update_bit_for_bit(
    name: str, channels_last: bool, dtype: torch.dtype
) -> None:
    """The op that also updates the running statistics (taken when a training batch has no tail
    ghost batch) gives y, gradients, running_mean, running_var and num_batches_tracked identical
    to the op followed by the Python update, over several steps and with a momentum that is not
    the default."""
    xg = _grouped(name, channels_last, dtype)
    results = []
    for fused in (True, False):
        bn = _bn_for(xg, momentum=0.3)
        results.append([_tracked_step(fused, xg * (k + 1), bn) for k in range(3)])
    assert int(results[0][-1][-1]) == 3 * xg.shape[0]  # num_batches_tracked counts ghost batches
    for step_got, step_want in zip(*results, strict=True):
        for got, want in zip(step_got, step_want, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)


@needs_op
def test_fused_running_update_declares_its_mutations() -> None:
    """The op's schema marks the buffers it writes (what opcheck's schema test checks)."""
    bn = torch.nn.BatchNorm1d(5).double()
    xg = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    weights, decay = _math.ema_coefficients(0.1, 3, 3, xg.dtype, xg.device)
    args = (xg, bn.weight, bn.bias, 1e-5, *bn.buffers(), weights, decay, 4 / 3, dims(xg))
    torch.library.opcheck(
        cpu.cpp_ops().eager_cpu_ghost_norm_update.default, args, test_utils=("test_schema",)
    )


@needs_op
def test_fused_running_update_is_taken_only_where_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transformed model's training batches take the fused op, a tail ghost batch's call
    and momentum=None included: the Python update never runs, and the running statistics are
    the chunked reference's. Buffers the kernel cannot take (here not contiguous) take the
    Python update, inside the ctypes Function."""
    calls = []
    update = _math.update_running_stats
    monkeypatch.setattr(
        _math, "update_running_stats", lambda *a, **k: calls.append(1) or update(*a, **k)
    )
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8)).double()
    run_side_by_side(model, 4, [(12, 6), (8, 6)], [])
    run_side_by_side(model, 4, [(10, 6)], [])  # a tail ghost batch
    model[1].momentum = None
    run_side_by_side(model, 4, [(12, 6), (10, 6)], [])
    assert calls == []
    xg = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    bn = _bn_for(xg)
    bn.running_mean = torch.zeros(10, dtype=torch.float64)[::2]
    y = cpu.EAGER.norm(xg, NormParams(bn.weight, bn.bias, bn.eps), _update(bn, xg))[0]
    assert type(y.grad_fn).__name__ == "CpuKernelGhostNormBackward"
    assert len(calls) == 1 and int(bn.num_batches_tracked) == 3


@needs_op
def test_eager_layers_run_the_autograd_op() -> None:
    """A transformed model's eager CPU step goes through the C++ op (its backward node), and
    matches the chunked reference."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8)).double()
    # Uneven batches too (a tail ghost batch normalized by a second op call), then eval.
    gm = run_side_by_side(model, 4, [(12, 6), (10, 6)], [(5, 6)])
    y = gm.train()(torch.randn(12, 6, dtype=torch.float64))
    assert "fxghost::GhostNorm" in y.grad_fn.name()


def test_without_the_autograd_op_the_kernels_run_through_ctypes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the C++ op cannot be built, the cpu backend runs the same kernels through the
    Python Function, and says so in its label."""
    if not cpu.available():
        pytest.skip("no C compiler here")
    monkeypatch.setattr(cpu, "cpp_ops", lambda: None)
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = cpu.EAGER.norm(x, NormParams(None, None, 1e-5))[0]
    assert type(y.grad_fn).__name__ == "CpuKernelGhostNormBackward"
    assert cpu.EAGER.label == "cpu (ctypes)"


def test_failed_build_is_remembered(
    tmp_path: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A source that does not compile gives None, a .failed file with the compiler's message,
    and one line on stderr saying what runs instead; the next attempt does not compile again."""
    if cpu.library_path() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("FXGHOST_CACHE_DIR", str(tmp_path))
    source = tmp_path / "broken.c"
    source.write_text("int f(void) { return undefined_name; }\n")
    compiler = ("CC", ("cc", "gcc", "clang"))
    how = {"what": "a broken thing", "fallback": "nothing"}
    assert cpu.build("broken", [source], compiler, [["-O0"], ["-O1"]], **how) is None
    (failed,) = tmp_path.glob("broken_*.failed")
    message = failed.read_text()
    assert "undefined_name" in message and "-O0" in message and "-O1" in message
    assert not list(tmp_path.glob("*.so"))
    err = capsys.readouterr().err
    assert "compiling a broken thing" in err and "could not compile a broken thing" in err
    assert "using nothing" in err

    def no_compile(*args: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(_build, "_compile", no_compile)
    assert cpu.build("broken", [source], compiler, [["-O0"], ["-O1"]], **how) is None


def test_implementation_for_routes_by_device_dtype_layout_and_compile() -> None:
    impl_for = backends.implementation_for
    cpu_impl = cpu.EAGER if cpu.available() else torch_ops.EAGER
    assert impl_for(torch.zeros(1, 2, 3)) is cpu_impl
    channels_last = torch.zeros(8, 3, 4, 5).to(memory_format=torch.channels_last)
    assert impl_for(channels_last.unflatten(0, (2, 4))) is cpu_impl
    # Not a dense view (every other sample): the kernels need one, torch ops do not.
    assert impl_for(torch.zeros(2, 8, 3)[:, ::2]) is torch_ops.EAGER
    # 16-bit inputs too, read and written in their dtype.
    assert impl_for(torch.zeros(1, 2, 3, dtype=torch.bfloat16)) is cpu_impl
    assert impl_for(torch.zeros(1, 2, 3, dtype=torch.float16)) is cpu_impl
    # A chosen backend wins, and says which layer cannot take an input.
    assert impl_for(torch.zeros(1, 2, 3), "torch") is torch_ops.EAGER
    with pytest.raises(ValueError, match="layer 'bn' runs with backend='cpu'"):
        impl_for(torch.zeros(1, 2, 3, dtype=torch.complex64), "cpu", "bn")


def test_torch_backend_compiles_nothing(tmp_path: pytest.TempPathFactory) -> None:
    """backend="torch" runs plain torch ops, and builds no kernel (an empty cache stays empty)."""
    code = (
        "import torch, fxghost; "
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)); "
        "gm = fxghost.transform(m, 2, backend='torch'); gm(torch.randn(4, 3, 5, 5)).sum(); "
        "print(fxghost.report(gm).layers[0].backend)"
    )
    env = {**os.environ, "FXGHOST_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert done.stdout.strip() == "torch"
    assert list(tmp_path.iterdir()) == []


@needs_kernels
def test_cpu_kernels_cache_is_keyed_and_reused(tmp_path: pytest.TempPathFactory) -> None:
    """A fresh cache directory gets one compiled object (with its digest and build lock); a
    second process reuses it."""
    code = "from fxghost.backends import cpu; print(cpu.library_path())"
    env = {**os.environ, "FXGHOST_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            check=True,
            timeout=300,
            capture_output=True,
            text=True,
        )
        for _ in range(2)
    ]
    paths = [run.stdout.strip() for run in runs]
    first_err = runs[0].stderr
    assert paths[0] == paths[1] and runs[1].stderr == ""
    assert os.path.dirname(paths[0]) == str(tmp_path)
    stem = os.path.basename(paths[0]).removesuffix(".so")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{stem}.lock", f"{stem}.sha256", f"{stem}.so"]
    assert "compiling the CPU kernels" in first_err


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("name", "channels_last"), [("tabular", False), ("nchw", False), ("nchw", True)]
)
def test_cpu_custom_ops_pass_opcheck(name: str, channels_last: bool, dtype: torch.dtype) -> None:
    """The ops torch.compile runs on CPU: schema, fake (meta) outputs, autograd registration."""
    xg = _grouped(name, channels_last, dtype).requires_grad_()
    channels = xg.shape[2]
    w = (torch.rand(channels) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(channels).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.fxghost.cpu_ghost_norm.default, (xg, w, b, 1e-5))
    torch.library.opcheck(torch.ops.fxghost.cpu_ghost_norm.default, (xg, None, None, 1e-5))
    mean = torch.randn(xg.shape[0], channels, dtype=dtype)
    rstd = torch.rand(xg.shape[0], channels, dtype=dtype) + 0.5
    dy = torch.randn(xg.shape, dtype=dtype)
    args = (dy, xg.detach(), w.detach(), mean, rstd)
    torch.library.opcheck(torch.ops.fxghost.cpu_ghost_norm_backward.default, args)
    assert torch.autograd.gradcheck(
        lambda x, w, b: cpu.custom_op_norm(x, w, b, 1e-5)[0],
        tuple(t.detach().double().requires_grad_() for t in (xg, w, b)),
    )


@needs_kernels
def test_cpu_custom_op_takes_layouts_the_trace_did_not_see() -> None:
    """Compiled code may hand the op a strided input: it computes densely and returns the
    layout the fake implementation promised."""
    xg = _grouped("nchw", False, torch.float64)
    strided = torch.zeros(xg.shape[0], 2 * xg.shape[1], *xg.shape[2:], dtype=xg.dtype)[:, ::2]
    strided.copy_(xg)  # every other sample of a larger tensor
    w = torch.rand(xg.shape[2], dtype=torch.float64) + 0.5
    b = torch.randn(xg.shape[2], dtype=torch.float64)
    got = torch.ops.fxghost.cpu_ghost_norm(strided, w, b, 1e-5)
    want = torch.ops.fxghost.cpu_ghost_norm(xg, w, b, 1e-5)
    assert got[0].stride() == torch.empty_like(strided.flatten(0, 1)).stride()
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    dy = torch.randn(xg.shape, dtype=torch.float64)
    mean, rstd = want[1], want[3]
    got_b = torch.ops.fxghost.cpu_ghost_norm_backward(dy, strided, w, mean, rstd)
    want_b = torch.ops.fxghost.cpu_ghost_norm_backward(dy, xg, w, mean, rstd)
    for g, e in zip(got_b, want_b, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
