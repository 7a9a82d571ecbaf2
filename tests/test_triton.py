"""The Triton ghost-BN kernels against float64 torch formulas, on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` only takes effect if it is set before triton is imported, and other test
modules of the same pytest process import torch (and maybe triton) first. So the kernel checks are
the ``check_*`` functions below, which the outer run does not collect: ``test_interpreted_checks``
runs them in a fresh pytest subprocess with the variable set, and fails with that run's output.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from bn_layers import MISSING, partial_bn
from conftest import (
    BN_SHAPES,
    DEVICE,
    assert_state_scaled,
    init_bn,
    input_shape,
    run_checks_interpreted,
    run_side_by_side,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# name: (per-sample shape (C, *spatial), memory format); the comment gives the kernels' layout.
LAYOUTS: dict[str, tuple[tuple[int, ...], torch.memory_format]] = {
    "nc": ((5,), torch.contiguous_format),  # C innermost, no spatial dims
    "ncl": ((5, 7), torch.contiguous_format),  # spatial innermost
    "nchw": ((5, 7, 5), torch.contiguous_format),  # spatial innermost
    "nhwc": ((5, 7, 5), torch.channels_last),  # C innermost
    "ncdhw": ((3, 2, 3, 2), torch.contiguous_format),  # spatial innermost
    "ndhwc": ((3, 2, 3, 2), torch.channels_last_3d),  # C innermost
}

# (rtol, atol) of results rounded to the input dtype; float32 statistics get STATS_TOL.
OUT_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
STATS_TOL = (1e-5, 1e-5)
EPS = 1e-5


def test_interpreted_checks() -> None:
    run_checks_interpreted(__file__, timeout=600)


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="needs a plain CPU process")
def test_cpu_tensors_need_the_interpreter() -> None:
    from fxghost.backends import triton as _triton

    assert not _triton.supported(torch.randn(2, 3, 5))


class _FakeCompiled:
    """What Triton's dispatch returns: a compiled kernel that launches with every parameter."""

    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def runner(*args: Any, stream: int | None = None) -> None:
            # As Triton's: the launcher takes three grid dimensions.
            self.calls.append(("direct", (grid[0], grid[1], grid[2]), args, stream))

        return runner


class _FakeKernel:
    """A JIT kernel ``(x_ptr, n, BA: constexpr, BB: constexpr)`` that records its launches."""

    arg_names = ["x_ptr", "n", "BA", "BB"]

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def launch(*args: Any, num_warps: int, **consts: Any) -> _FakeCompiled:
            self.calls.append(("jit", grid, args, consts, num_warps))
            return _FakeCompiled(self.calls)

        return launch


def test_direct_launch_reuses_what_the_dispatch_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_kernel: the first launch of a specialization through Triton's dispatch, later ones
    through the compiled kernel it returned, with the constexprs appended positionally; anything
    that would change Triton's specialization (dtype, pointer alignment) or that run_kernel
    cannot order goes back to the dispatch."""
    from types import SimpleNamespace

    from fxghost.backends.triton import launch

    monkeypatch.setattr(launch, "DIRECT_LAUNCH", True)
    kernel, lp = _FakeKernel(), SimpleNamespace(runners={})
    x = torch.zeros(64)
    consts = (("BA", 4), ("BB", 1))

    def run(t: Tensor, order: tuple[tuple[str, int], ...] = consts) -> tuple[Any, ...]:
        launch.run_kernel(lp, kernel, (3,), 7, (t, 5), order, 2)  # type: ignore[arg-type]
        return kernel.calls[-1]

    assert run(x) == ("jit", (3,), (x, 5), {"BA": 4, "BB": 1}, 2)
    assert run(x) == ("direct", (3, 1, 1), (x, 5, 4, 1), 7)
    assert run(x)[0] == "direct"
    assert run(x.double())[0] == "jit"  # another dtype: another specialization
    assert run(x.double())[0] == "direct"
    unaligned = x[1:]  # 4 bytes past an aligned pointer: Triton would specialize differently
    assert [run(unaligned)[0] for _ in range(2)] == ["jit", "jit"]
    swapped = (("BB", 1), ("BA", 4))  # not the signature's order: positions would be wrong
    assert [run(x, swapped)[0] for _ in range(2)] == ["jit", "jit"]
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", False)
    assert run(x)[0] == "jit"


# --------------------------------------------------------------------------------------------
# Interpreted checks (collected only by the subprocess above)
# --------------------------------------------------------------------------------------------


def _grouped(
    layout: str, groups: int, per_group: int, dtype: torch.dtype, tail: bool = False
) -> Tensor:
    """A grouped view ``(G, c, C, *spatial)`` of an ``(N, C, *spatial)`` tensor in ``layout``.

    ``tail`` takes the groups from the end of a larger batch, like fxghost's last, smaller ghost
    batch: the view then starts at a nonzero storage offset.
    """
    sample, fmt = LAYOUTS[layout]
    extra = 2 if tail else 0
    x = torch.randn(groups * per_group + extra, *sample, dtype=torch.float64) * 2.0 + 0.5
    x = x.to(dtype).contiguous(memory_format=fmt)[extra:]
    return x.view(groups, per_group, *sample)


def _dims(xg: Tensor) -> list[int]:
    return [1, *range(3, xg.dim())]


def _bcast(t: Tensor, xg: Tensor) -> Tensor:
    """``(G, C)`` to ``(G, 1, C, 1...)``."""
    return t.reshape(t.shape[0], 1, t.shape[1], *([1] * (xg.dim() - 3)))


def _close(actual: Tensor, expected: Tensor, tol: tuple[float, float], what: str) -> None:
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}"
    )


def _check_all(xg: Tensor, weight: Tensor | None) -> None:
    """Every kernel on ``xg`` against float64 formulas on the same (rounded) values."""
    from fxghost.backends import triton as _triton

    assert _triton.supported(xg)
    G, C = xg.shape[0], xg.shape[2]
    count = xg[0, :, 0].numel()
    out_tol = OUT_TOL[xg.dtype]
    xd = xg.double()

    mean, var = _triton.stats(xg)
    var_ref, mean_ref = torch.var_mean(xd, dim=_dims(xg), correction=0)
    assert mean.dtype == var.dtype == torch.float32
    assert mean.shape == var.shape == (G, C)
    _close(mean, mean_ref, STATS_TOL, "mean")
    _close(var, var_ref, STATS_TOL, "var")

    scale = torch.rand(G, C) + 0.5
    shift = torch.randn(G, C)
    y = _triton.normalize(xg, scale, shift)
    assert y.dtype == xg.dtype and y.shape == xg.shape and y.stride() == xg.stride()
    y_ref = xd * _bcast(scale.double(), xg) + _bcast(shift.double(), xg)
    _close(y, y_ref, out_tol, "normalize")

    # The statistics' finishing launch: rstd, the affine coefficients, the running statistics.
    bias = torch.randn(C) if weight is not None else None
    r_mean, r_var = torch.randn(C), torch.rand(C) + 0.5
    nbt = torch.tensor(7)
    ema = torch.rand(G)
    update = _triton.RunningUpdate(r_mean.clone(), r_var.clone(), nbt, ema, 0.75, 1.25)
    _, _, rstd, scale_k, shift_k = _triton.forward_stats(xg, weight, bias, EPS, update)
    rstd_ref = torch.rsqrt(var_ref + EPS)
    scale_ref = rstd_ref * (1.0 if weight is None else weight.double())
    shift_ref = -mean_ref * scale_ref + (0.0 if bias is None else bias.double())
    _close(rstd, rstd_ref, STATS_TOL, "rstd")
    _close(scale_k, scale_ref, STATS_TOL, "scale")
    _close(shift_k, shift_ref, (1e-5, 1e-4), "shift")
    ema64 = ema.double()[:, None]
    _close(
        update.running_mean,
        0.75 * r_mean.double() + (ema64 * mean_ref).sum(0),
        STATS_TOL,
        "running_mean",
    )
    _close(
        update.running_var,
        0.75 * r_var.double() + 1.25 * (ema64 * var_ref).sum(0),
        STATS_TOL,
        "running_var",
    )
    assert nbt.item() == 7 + G, "num_batches_tracked"

    # Backward against the float64 statistics, so only the kernels' own rounding is measured.
    mean64, rstd64 = mean_ref, torch.rsqrt(var_ref + EPS)
    mean32, rstd32 = mean64.float(), rstd64.float()
    dy = torch.randn(xg.shape, dtype=torch.float64).to(xg.dtype)
    dy = torch.empty_like(xg).copy_(dy)  # same strides as xg
    sum_dy, sum_dy_xhat = _triton.backward_reduce(dy, xg, mean32, rstd32)
    dyd = dy.double()
    xhat = (xd - _bcast(mean32.double(), xg)) * _bcast(rstd32.double(), xg)
    sum_dy_ref = dyd.sum(_dims(xg))
    sum_dy_xhat_ref = (dyd * xhat).sum(_dims(xg))
    assert sum_dy.dtype == sum_dy_xhat.dtype == torch.float32
    assert sum_dy.shape == sum_dy_xhat.shape == (G, C)
    _close(sum_dy, sum_dy_ref, (1e-5, 1e-4), "sum_dy")
    _close(sum_dy_xhat, sum_dy_xhat_ref, (1e-5, 1e-4), "sum_dy_xhat")
    _, _, dbias, dweight = _triton.backward_sums(dy, xg, mean32, rstd32)
    _close(dbias, sum_dy_ref.sum(0), (1e-5, 1e-4), "bias gradient (sum over groups)")
    _close(dweight, sum_dy_xhat_ref.sum(0), (1e-5, 1e-4), "weight gradient (sum over groups)")

    dx = _triton.backward_apply(dy, xg, mean32, rstd32, weight, sum_dy, sum_dy_xhat, count)
    assert dx.dtype == xg.dtype and dx.shape == xg.shape and dx.stride() == xg.stride()
    w = 1.0 if weight is None else weight.double().reshape(1, 1, C, *([1] * (xg.dim() - 3)))
    dx_ref = (
        w
        * _bcast(rstd32.double(), xg)
        * (
            dyd
            - _bcast(sum_dy.double(), xg) / count
            - xhat * _bcast(sum_dy_xhat.double(), xg) / count
        )
    )
    _close(dx, dx_ref, out_tol, "backward_apply")


@pytest.fixture(autouse=True)
def _on_test_device() -> Iterator[None]:
    """Tensors made without a device go to ``FXGHOST_TEST_DEVICE``: with ``cuda`` on a GPU machine
    the checks below run on the real kernels (the interpreted run leaves it at ``cpu``)."""
    with torch.device(DEVICE):
        yield


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny tiles and many programs per group: multi-tile loops, partial tiles, split groups,
    and partial merges over more than one chunk (more than 32 programs per group)."""
    from fxghost.backends.triton import launch

    config = dataclasses.replace(
        launch.CONFIG,
        reduce_tile=16,
        apply_tile=16,
        programs_per_sm=64,
        min_tiles_per_program=1,
        finish_tile=4,  # the finishing kernels loop over single groups and partials
    )
    monkeypatch.setattr(launch, "CONFIG", config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def check_kernels(layout: str, dtype: torch.dtype) -> None:
    groups = 1 + len(layout) % 4  # 1 to 4 groups, varying with the layout
    weight = torch.rand(LAYOUTS[layout][0][0]) + 0.5 if dtype != torch.float16 else None
    _check_all(_grouped(layout, groups, 3, dtype), weight)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def check_kernels_small_tiles(layout: str, small_tiles: None) -> None:
    _check_all(_grouped(layout, 3, 3, torch.float32), torch.rand(LAYOUTS[layout][0][0]) + 0.5)


@pytest.mark.parametrize("layout", ["nhwc", "ncl"])
def check_tail_group(layout: str) -> None:
    xg = _grouped(layout, 1, 2, torch.bfloat16, tail=True)
    assert xg.storage_offset() > 0
    _check_all(xg, None)


def check_large_mean_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Centred accumulation: a mean of 1000 costs no precision (sum/sum-of-squares would)."""
    from fxghost.backends import triton as _triton
    from fxghost.backends.triton import launch

    # 32 tiles of 32 rows per group, split over several programs.
    config = dataclasses.replace(launch.CONFIG, reduce_tile=64, min_tiles_per_program=1)
    monkeypatch.setattr(launch, "CONFIG", config)
    x = torch.randn(8, 2, 16, 16, dtype=torch.float64) * 0.5 + 1000.0
    xg = x.float().contiguous(memory_format=torch.channels_last).view(2, 4, 2, 16, 16)
    mean, var = _triton.stats(xg)
    var_ref, mean_ref = torch.var_mean(xg.double(), dim=_dims(xg), correction=0)
    _close(mean, mean_ref, (1e-6, 0.0), "mean")
    _close(var, var_ref, (1e-4, 0.0), "var")


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def check_matches_autograd(layout: str) -> None:
    """stats + backward_reduce + backward_apply give autograd's input gradient of ghost BN."""
    from fxghost.backends import triton as _triton

    xg = _grouped(layout, 2, 3, torch.float32)
    C = xg.shape[2]
    weight = torch.rand(C) + 0.5
    bias = torch.randn(C)
    shape = [1, 1, C] + [1] * (xg.dim() - 3)

    x64 = xg.double().requires_grad_()
    var, mean = torch.var_mean(x64, dim=_dims(xg), correction=0, keepdim=True)
    y = (x64 - mean) * torch.rsqrt(var + EPS) * weight.double().view(shape)
    y = y + bias.double().view(shape)
    dy = torch.randn(xg.shape, dtype=torch.float64)
    (dx_ref,) = torch.autograd.grad(y, x64, dy)

    mean32, var32 = _triton.stats(xg)
    rstd32 = torch.rsqrt(var32 + EPS)
    # dy arrives contiguous whatever xg's layout: the kernels must lay it out like xg.
    dy32 = dy.float().contiguous()
    sums = _triton.backward_reduce(dy32, xg, mean32, rstd32)
    dx = _triton.backward_apply(dy32, xg, mean32, rstd32, weight, *sums, xg[0, :, 0].numel())
    _close(dx, dx_ref, (1e-4, 1e-5), "dx")


def check_supported() -> None:
    from fxghost.backends import triton as _triton

    x = torch.randn(8, 5, 4, 3)
    assert _triton.supported(x.view(2, 4, 5, 4, 3))
    assert _triton.supported(x.contiguous(memory_format=torch.channels_last).view(2, 4, 5, 4, 3))
    assert not _triton.supported(x.double().view(2, 4, 5, 4, 3))
    # Not dense: every other channel; nor a layout with samples innermost.
    strided = torch.randn(8, 10, 4, 3)[:, ::2]
    assert not _triton.supported(strided.view(2, 4, 5, 4, 3))
    samples_inner = torch.randn(5, 4, 3, 8).permute(3, 0, 1, 2)
    assert not _triton.supported(samples_inner.view(2, 4, 5, 4, 3))
    assert not _triton.supported(torch.empty(0, 4, 5))
    with pytest.raises(ValueError, match="unsupported"):
        _triton.stats(strided.view(2, 4, 5, 4, 3))


@pytest.mark.parametrize("missing", ["weight", "bias"])
def check_missing_parameter_kernels(missing: str) -> None:
    """The statistics' finishing launch with a bias and no weight, or a weight and no bias
    (each 1 or 0 where missing), and the input gradient without a weight."""
    from fxghost.backends import triton as _triton

    xg = _grouped("nhwc", 2, 3, torch.float32)
    C = xg.shape[2]
    weight = None if missing == "weight" else torch.rand(C) + 0.5
    bias = None if missing == "bias" else torch.randn(C)
    _, _, rstd, scale, shift = _triton.forward_stats(xg, weight, bias, EPS)
    var_ref, mean_ref = torch.var_mean(xg.double(), dim=_dims(xg), correction=0)
    scale_ref = torch.rsqrt(var_ref + EPS) * (1.0 if weight is None else weight.double())
    shift_ref = (0.0 if bias is None else bias.double()) - mean_ref * scale_ref
    _close(scale, scale_ref, STATS_TOL, "scale")
    _close(shift, shift_ref, (1e-5, 1e-4), "shift")


def _require_triton_path() -> None:
    from fxghost import backends

    x = torch.zeros(1, 2, 3, device=DEVICE)
    if backends.implementation_for(x, "triton") is not backends.triton.EAGER:
        pytest.fail(f"the Triton backend cannot take a float32 tensor on {DEVICE}")


@pytest.mark.parametrize("missing", MISSING)
@pytest.mark.parametrize("kind", ["1d_NC", "2d"])
def check_missing_parameter_matches_reference(kind: str, missing: str) -> None:
    """A layer without its weight or its bias through the Triton Function, whole and uneven
    batches, with the update in the kernels (momentum 0.1) and from Python (None)."""
    _require_triton_path()
    for momentum in (0.1, None):
        torch.manual_seed(0)
        cls, sample = BN_SHAPES[kind]
        bn = partial_bn(cls, sample[0], missing, torch.float32, momentum=momentum)
        model = nn.Sequential(bn)
        shapes = [input_shape(kind, 8), input_shape(kind, 10)]
        run_side_by_side(model, 4, shapes, dtype=torch.float32, backend="triton")


class _Checkpointed(nn.Module):
    """A checkpointed block that ends in a BatchNorm, whose saved tensors end the
    recomputation (PyTorch's default early stop)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


@pytest.mark.parametrize("momentum", [0.1, None])
def check_last_batchnorm_of_a_checkpointed_block(momentum: float | None) -> None:
    """Running statistics and num_batches_tracked are the reference's under the same
    checkpointing, whole ghost batches and a shorter last one."""
    _require_triton_path()
    torch.manual_seed(0)
    model = _Checkpointed().to(DEVICE)
    init_bn(model.block[1], torch.float32).momentum = momentum
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = fxghost.transform(model, 4, backend="triton")
    for n in (8, 10):
        x = torch.randn(n, 3, 3, 3, device=DEVICE)
        x_ref = x.clone().requires_grad_()
        y, y_ref = gm(x.requires_grad_()), reference(x_ref)
        # A loss that weighs the outputs unevenly: the sum of squares of a normalized batch is
        # nearly constant in it, and its gradients nearly all rounding.
        r = torch.randn(y.shape, device=DEVICE)
        (y * r).sum().backward()
        (y_ref * r).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        # float32 with few values per channel: each tensor to its own scale
        assert_state_scaled(model, reference, f"N={n}", 1e-4)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    assert int(model.block[1].num_batches_tracked) == 2 * (2 + 3)


# --------------------------------------------------------------------------------------------
# The fused ReLU and residual-add epilogue: bit for bit the unfused graph
# --------------------------------------------------------------------------------------------

EPILOGUE_LAYOUTS = ("nchw", "nhwc", "nc")  # contiguous and channels_last 4D, tabular (N, C)
FUSED_BACKWARD = "TritonEpilogueGhostNormBackward"


def _same(actual: Tensor | None, expected: Tensor | None, what: str) -> None:
    """torch.equal, with NaNs where the other has NaNs."""
    assert actual is not None and expected is not None, what
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = actual.isnan()
    assert torch.equal(nan, expected.isnan()), f"{what}: NaNs differ"
    assert torch.equal(actual.masked_fill(nan, 0), expected.masked_fill(nan, 0)), what


def _epilogue_inputs(
    layout: str, dtype: torch.dtype, add: bool, nan: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(xg, weight, bias, residual)``: 2 ghost batches of 4, a NaN in the input (one
    channel of the second group), and a residual laid out as ``xg`` with exact zeros (sample
    1) and values that cancel the normalization exactly (sample 2: the sum is an exact 0)."""
    from fxghost.backends import triton as _triton
    from fxghost.backends._common import NormParams

    xg = _grouped(layout, 2, 4, dtype)
    C = xg.shape[2]
    if nan:
        xg[(1, 3, 1) + (0,) * (xg.dim() - 3)] = float("nan")
    weight = torch.rand(C) + 0.5
    bias = torch.randn(C)
    if not add:
        return xg, weight, bias, None
    residual = torch.empty_like(xg).copy_(torch.randn(xg.shape, dtype=torch.float64))
    assert residual.stride() == xg.stride()
    with torch.no_grad():
        bn = _triton.EAGER.norm(xg, NormParams(weight, bias, EPS))[0].view(xg.shape)
    residual[:, 1] = 0.0
    residual[:, 2] = -bn[:, 2]
    return xg, weight, bias, residual


def _epilogue_step(
    xg: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    dy: Tensor,
    fused: bool,
    momentum: float | None = 0.1,
) -> dict[str, Any]:
    """Forward and backward of the Triton backend with the epilogue (``fused``), or without it
    followed by torch's add and ReLU: outputs, the gradients of every input that needs one,
    and the running statistics."""
    from fxghost.backends import triton as _triton
    from fxghost.backends._common import Epilogue, NormParams, RunningStatsUpdate

    C = xg.shape[2]
    running = (torch.zeros(C), torch.ones(C), torch.tensor(3))
    update = RunningStatsUpdate(*running, momentum, xg.shape[0] * xg.shape[1])
    leaves = [t for t in (xg, weight, bias, residual) if t is not None and t.requires_grad]
    params = NormParams(weight, bias, EPS)
    if fused:
        epilogue = Epilogue(residual, True)
        y, mean, var = _triton.EAGER.norm(xg, params, update, epilogue)
    else:
        y, mean, var = _triton.EAGER.norm(xg, params, update)
        y = torch.relu(y if residual is None else y + residual.flatten(0, 1))
    grads = torch.autograd.grad(y, leaves, dy) if leaves else ()
    return {
        "y": y,
        "backward": type(y.grad_fn).__name__,
        "stats": (mean, var, *running),
        "grads": dict(zip([id(t) for t in leaves], grads, strict=True)),
    }


def _assert_same_steps(
    xg: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, what: str, **kw: Any
) -> dict[str, Any]:
    """The fused step and the unfused one give the same results bit for bit; returns the
    fused one's."""
    dy = torch.randn(xg.flatten(0, 1).shape, dtype=torch.float64).to(xg.dtype)
    fused = _epilogue_step(xg, weight, bias, residual, dy, True, **kw)
    unfused = _epilogue_step(xg, weight, bias, residual, dy, False, **kw)
    y = fused["y"]
    _same(y, unfused["y"], f"{what}: y")
    # Sample-first, fresh, laid out as the input.
    assert y.shape == xg.flatten(0, 1).shape and y._base is None, what
    assert y.view(xg.shape).stride() == xg.stride(), what
    for i, (a, b) in enumerate(zip(fused["stats"], unfused["stats"], strict=True)):
        _same(a, b, f"{what}: statistics {i}")
    assert fused["grads"].keys() == unfused["grads"].keys(), what
    names = {id(weight): "weight", id(bias): "bias", id(xg): "input", id(residual): "residual"}
    for key, grad in fused["grads"].items():
        _same(grad, unfused["grads"][key], f"{what}: {names[key]} gradient")
    return fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def check_epilogue_is_the_unfused_graph(dtype: torch.dtype) -> None:
    """relu(bn(x)) and relu(bn(x) + residual) in the kernels: output, statistics, running
    statistics (the update in the kernels, and from Python), and the input, weight, bias and
    residual gradients, bit for bit the unfused ops', NaN included."""
    torch.manual_seed(0)
    for i, layout in enumerate(EPILOGUE_LAYOUTS):
        for add in (False, True):
            what = f"{layout}, {'add_relu' if add else 'relu'}"
            xg, weight, bias, residual = _epilogue_inputs(layout, dtype, add)
            for t in (xg, weight, bias, residual):
                if t is not None:
                    t.requires_grad_()
            momentum = None if i == 1 else 0.1
            fused = _assert_same_steps(xg, weight, bias, residual, what, momentum=momentum)
            assert fused["backward"] == FUSED_BACKWARD, what
            y = fused["y"]
            assert (y == 0).any() and y.isnan().any() and (y > 0).any(), what


def check_epilogue_gradients_asked_for(small_tiles: None) -> None:
    """Only the gradients asked for (no residual gradient; the residual's alone, without the
    input's or the parameters'), with small tiles: reductions split over several programs."""
    torch.manual_seed(1)
    xg, weight, bias, residual = _epilogue_inputs("nc", torch.float32, True)
    assert residual is not None
    xg.requires_grad_()
    weight.requires_grad_()
    fused = _assert_same_steps(xg, weight, bias, residual, "input and weight gradients")
    assert fused["grads"].keys() == {id(xg), id(weight)}
    residual.requires_grad_()
    xg.requires_grad_(False)
    weight.requires_grad_(False)
    fused = _assert_same_steps(xg, weight, bias, residual, "residual gradient alone")
    assert fused["grads"].keys() == {id(residual)}
    assert fused["backward"] == FUSED_BACKWARD


def check_epilogue_residual_of_another_layout_falls_back() -> None:
    """A residual whose strides differ from the input's: the epilogue follows the kernels in
    torch ops, and the results are still the unfused graph's."""
    torch.manual_seed(2)
    xg, weight, bias, residual = _epilogue_inputs("nchw", torch.float32, True)
    assert residual is not None
    other = residual.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    other = other.view(residual.shape)
    assert other.stride() != xg.stride()
    for t in (xg, weight, bias, other):
        t.requires_grad_()
    fused = _assert_same_steps(xg, weight, bias, other, "channels_last residual")
    assert fused["backward"] != FUSED_BACKWARD


def check_epilogue_double_backward() -> None:
    """create_graph=True: differentiable first-order gradients (the masked gradient through
    torch's threshold_backward), and second-order ones, those of the unfused graph."""
    from fxghost.backends import triton as _triton
    from fxghost.backends._common import Epilogue, NormParams

    torch.manual_seed(3)
    xg, weight, bias, residual = _epilogue_inputs("nhwc", torch.float32, True, nan=False)
    assert residual is not None
    leaves = [t.requires_grad_() for t in (xg, weight, bias, residual)]
    dy = torch.randn(xg.flatten(0, 1).shape)
    v = torch.randn(xg.shape)
    results = []
    for fused in (True, False):
        params = NormParams(weight, bias, EPS)
        if fused:
            y = _triton.EAGER.norm(xg, params, None, Epilogue(residual, True))[0]
            assert type(y.grad_fn).__name__ == FUSED_BACKWARD
        else:
            y = torch.relu(_triton.EAGER.norm(xg, params)[0] + residual.flatten(0, 1))
        grads = torch.autograd.grad(y, leaves, dy, create_graph=True)
        second = torch.autograd.grad((grads[0] * v).sum(), (xg, weight), allow_unused=True)
        results.append((*grads, *second))
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=i: f"gradient {i}: {m}")
