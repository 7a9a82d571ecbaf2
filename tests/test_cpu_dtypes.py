"""The CPU kernels on every dtype they take, and their fused epilogues: 16-bit inputs read and
written in 16 bits with float32 statistics, within ULP_TOL of float64; the ReLU and residual-add
epilogues bit for bit the unfused ops, on every dtype and layout."""

from __future__ import annotations

import copy
import ctypes
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_ulp_close, init_bns
from torch import nn
from torch._dynamo.backends.debugging import aot_eager

import fxghost
from fxghost import backends
from fxghost.backends import cpu
from fxghost.backends._common import NormParams
from fxghost.backends._dims import dims
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not cpu.op_available(), reason="the CPU kernels' C++ op is not built here"),
]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = [torch.bfloat16, torch.float16]
EPS = 1e-5
# (grouped shape, channels_last): a 2D conv layer contiguous and channels_last, a tabular layer,
# and one whose rows are shorter than a vector.
LAYOUTS = {
    "nchw": ((4, 8, 16, 5, 5), False),
    "channels_last": ((4, 8, 16, 5, 5), True),
    "tabular": ((3, 32, 64), False),
    "narrow": ((2, 7, 3), False),
}


def _grouped(values: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    shape, channels_last = LAYOUTS[layout]
    t = values.reshape(shape)
    if channels_last:
        t = t.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape)
    return t.to(dtype)


def _op(
    xg: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    residual: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    ops = cpu.cpp_ops()
    return ops.eager_cpu_ghost_norm.default(xg, w, b, EPS, dims(xg), residual, relu)[0]  # type: ignore[no-any-return]


def _ctypes(xg: torch.Tensor, w: torch.Tensor, b: torch.Tensor, *_unused: object) -> torch.Tensor:
    return cpu.CpuKernelGhostNorm.run(xg, NormParams(w, b, EPS))[0]


def _float64_reference(
    xg: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Ghost normalization of the same values in float64, and its gradients for ``dy``."""
    x64 = xg.detach().double().requires_grad_()
    w64, b64 = (p.detach().double().requires_grad_() for p in (w, b))
    reduce = [1, *range(3, xg.dim())]
    var, mean = torch.var_mean(x64, dim=reduce, correction=0, keepdim=True)
    shape = [1] * xg.dim()
    shape[2] = xg.shape[2]
    y = ((x64 - mean) * torch.rsqrt(var + EPS) * w64.view(shape) + b64.view(shape)).flatten(0, 1)
    y.backward(dy.double())
    return y.detach(), mean, var, x64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("run", [_op, _ctypes], ids=["cpp_op", "ctypes"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", HALF)
def test_16bit_kernels_are_within_two_ulps_of_float64(
    dtype: torch.dtype, layout: str, run: Callable[..., torch.Tensor]
) -> None:
    """Outputs and input gradients in the input's 16-bit dtype, within ULP_TOL of the float64
    computation rounded to it; statistics and parameter gradients in float32, to float32
    accuracy."""
    torch.manual_seed(0)
    shape = LAYOUTS[layout][0]
    # A mean far from zero: two-pass statistics keep it from eating the variance.
    xg = _grouped(torch.randn(shape) * 3 + 5, layout, dtype).requires_grad_()
    w = (torch.rand(shape[2]) + 0.5).requires_grad_()
    b = torch.randn(shape[2]).requires_grad_()
    y = run(xg, w, b)
    assert y.dtype == dtype and y.stride() == xg.flatten(0, 1).stride()
    dy = torch.randn(y.shape).to(dtype)
    y.backward(dy)
    y64, _, _, dx64, dw64, db64 = _float64_reference(xg, w, b, dy)
    assert_ulp_close(y, y64, "output")
    assert xg.grad is not None and xg.grad.dtype == dtype
    assert_ulp_close(xg.grad, dx64, "input gradient")
    for got, want, what in ((w.grad, dw64, "weight"), (b.grad, db64, "bias")):
        assert got is not None and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.parametrize("epilogue", ["relu", "add_relu"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_epilogue_is_bitwise_the_unfused_ops(
    dtype: torch.dtype, layout: str, epilogue: str
) -> None:
    """relu(bn(x) [+ r]) in the kernel: the same output, input, parameter and residual
    gradients, bit for bit, as the kernel without its epilogue followed by torch's add and
    ReLU, negative values, zeros and NaNs included."""
    torch.manual_seed(1)
    shape = LAYOUTS[layout][0]
    x0 = torch.randn(shape) * 2 + 0.5
    x0.view(-1)[:: max(7, x0.numel() // 5)] = float("nan")  # a NaN in some channels
    x = _grouped(x0, layout, dtype)
    r0 = torch.randn(shape)
    r0.view(-1)[::3] = 0
    r = _grouped(r0, layout, dtype)
    w, b = torch.randn(shape[2]), torch.randn(shape[2])
    dy = torch.randn(x.flatten(0, 1).shape).to(dtype)
    results = []
    for fused in (True, False):
        xg, wp, bp = (t.clone().requires_grad_() for t in (x, w, b))
        res = r.clone().requires_grad_() if epilogue == "add_relu" else None
        if fused:
            y = _op(xg, wp, bp, res, True)
        else:
            y = _op(xg, wp, bp)
            y = torch.relu(y if res is None else y + res.flatten(0, 1))
        y.backward(dy)
        grads = [xg.grad, wp.grad, bp.grad] + ([] if res is None else [res.grad])
        results.append([y, *grads])
    names = ["output", "input", "weight", "bias", "residual"][: len(results[0])]
    for got, want, what in zip(*results, names, strict=True):
        assert got is not None and want is not None, what
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), what
        assert torch.equal(got.isnan(), want.isnan()), what


def test_fused_epilogue_saves_the_output_not_another_activation() -> None:
    """The fused op keeps for its backward what the unfused graph keeps: the input (for the
    normalization's gradient) and the output (for the ReLU's mask; an unfused ReLU saves it
    too), nothing activation-sized besides."""
    x = _grouped(torch.randn(LAYOUTS["nchw"][0]), "nchw", torch.float32).requires_grad_()
    r = torch.randn_like(x).requires_grad_()
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    big: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _op(x, w, b, r, True)
    assert len(big) == 2
    assert any(t.data_ptr() == x.data_ptr() for t in big)
    assert any(t.data_ptr() == y.data_ptr() for t in big)


class _Block(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> += identity -> ReLU, as a ResNet BasicBlock."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(identity))
        out += identity
        return self.relu(out)


def test_bfloat16_autocast_channels_last_runs_the_kernels_fused() -> None:
    """A bfloat16 autocast step on a channels_last ResNet block runs both layers in the C++ op,
    epilogues fused, and stays within bfloat16 accuracy of the chunked reference under the same
    autocast; compiled with backend='cpu', the custom ops give the eager result bit for bit
    (the running statistics move on between the two: each step starts from the last)."""
    torch.manual_seed(2)
    model = init_bns(_Block())
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = fxghost.transform(model, 4)
    x = torch.randn(12, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    outs = []
    for net in (gm, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(net(x))
    assert outs[0].dtype == torch.bfloat16
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=3e-2, atol=3e-2)
    layers = fxghost.report(gm).rewritten
    assert [(r.epilogue, backends.last_run(r.layer)) for r in layers] == [
        ("relu", "cpu (C++ op)"),
        ("add+relu", "cpu (C++ op)"),
    ]
    compiled_gm = fxghost.transform(model, 4, backend="cpu")
    traced_ops: list[str] = []

    def capture(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., object]:
        traced_ops.extend(str(n.target) for n in graph.graph.nodes if n.op == "call_function")
        return aot_eager(graph, inputs)  # type: ignore[no-any-return]

    compiled = torch.compile(compiled_gm, backend=capture, fullgraph=True)
    x_eager, x_compiled = (x.clone().requires_grad_() for _ in range(2))
    results = []
    for net, xi in ((gm, x_eager), (compiled, x_compiled)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(xi)
        y.float().square().sum().backward()
        results.append((y, xi.grad))
    assert backends.last_run(compiled_gm.bn2) == "cpu (custom op, compiled)"
    # Both layers' epilogues in the kernels' custom op: no ReLU or add left for inductor.
    assert traced_ops.count("fxghost.cpu_ghost_norm_relu.default") == 2
    assert not any("relu" in t and "fxghost" not in t for t in traced_ops), traced_ops
    (y_eager, dx_eager), (y_compiled, dx_compiled) = results
    assert torch.equal(y_compiled, y_eager), "output"
    assert torch.equal(dx_compiled, dx_eager), "input gradient"


def _f16_entry_points(path: str) -> tuple[Callable[..., int], Callable[..., int]]:
    lib = ctypes.CDLL(path)
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fwd, bwd = lib.fxg_forward_f16, lib.fxg_backward_f16
    fwd.argtypes = [ptr] * 8 + [i64] * 4 + [ctypes.c_double, i64, i64]
    bwd.argtypes = [ptr] * 10 + [i64] * 5
    fwd.restype = bwd.restype = ctypes.c_int
    return fwd, bwd


def _f16_pass(entry: tuple[Callable[..., int], Callable[..., int]], data: dict) -> list:
    """Forward (with the add-ReLU epilogue) and backward through one build's float16 kernels."""
    fwd, bwd = entry
    x, r, w, b, dy = (data[k] for k in ("x", "r", "w", "b", "dy"))
    G, A, C, S = data["dims"]
    y = torch.empty_like(x)
    mean, var, rstd = (torch.empty(G, C) for _ in range(3))
    p = [t.data_ptr() for t in (x, r, y, w, b, mean, var, rstd)]
    assert fwd(*p, G, A, C, S, EPS, 1, 1) == 0
    dx, dr, gw, gb = torch.empty_like(x), torch.empty_like(x), torch.empty(C), torch.empty(C)
    q = [t.data_ptr() for t in (dy, y, x, w, mean, rstd, dx, dr, gw, gb)]
    assert bwd(*q, G, A, C, S, 1) == 0
    return [y, dx, dr, mean, rstd, gw, gb]


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None,
    reason="the F16C build and its software twin are x86 builds with a C compiler",
)
def test_float16_f16c_staging_is_bitwise_the_software_conversions(tmp_path: Path) -> None:
    """Where the compiler targets F16C, float16 rows go through float buffers with its vector
    conversions; elsewhere through branch-free software conversions. Both builds of the same
    source give the same bits, with outputs spanning float16's subnormals to its overflow."""
    main = cpu.library_path()
    assert main is not None
    source = Path(cpu.__file__).with_name("cpu_kernels.c")
    flags = ["-O3", "-std=c99", "-fno-math-errno", "-fno-trapping-math", "-march=native"]
    software = tmp_path / "software.so"
    subprocess.run(
        ["cc", *flags, "-mno-f16c", "-fPIC", "-shared", str(source), "-lm", "-o", str(software)],
        check=True,
    )
    torch.manual_seed(3)
    G, A, C, S = 3, 8, 12, 37  # rows of 444 elements: a full tile of 256, a tail; 8 rows
    scales = torch.logspace(-7, 5, C)  # y from float16's subnormals to beyond its range
    data = {
        "dims": (G, A, C, S),
        "x": (torch.randn(G, A, C, S) * 3 + 1).half(),
        "r": torch.randn(G, A, C, S).half(),
        "w": scales.clone(),
        "b": torch.randn(C) * scales,
        "dy": (torch.randn(G, A, C, S) * scales.view(C, 1)).half(),
    }
    got = _f16_pass(_f16_entry_points(str(main)), data)
    want = _f16_pass(_f16_entry_points(str(software)), data)
    bits = got[0].view(torch.int16)
    assert got[0].isinf().any() and ((bits & 0x7C00 == 0) & (bits & 0x3FF != 0)).any()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(
            a.view(torch.int16 if a.dtype == torch.half else torch.int32),
            b.view(torch.int16 if b.dtype == torch.half else torch.int32),
        )
