"""torch.compile with no graph break, torch.export, and the compiled formulation, against the
chunked reference. (Real torchvision models in float64: tests/test_torchvision_models.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import RecordGraphs, assert_close, assert_same_state, make_bn, run_side_by_side
from torch import nn

import fxghost
from fxghost.backends import cpu, torch_ops
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        make_bn("2d"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 3, 5),
        make_bn("1d_NC"),
    ).double()


# Torch 2.7's inductor fails to schedule the backward of a Linear then a BatchNorm1d with a
# symbolic batch size, for plain BatchNorm1d too (KeyError in decide_inplace_update); 2.8 does not.
# fxghost's BatchNorm1d there (no fused ReLU) runs the C kernels' custom op where they are built,
# which inductor does not schedule: only the decomposition meets the bug.
_INDUCTOR_2_7 = pytest.mark.xfail(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 8) and not cpu.available(),
    reason="torch 2.7's inductor cannot compile Linear -> BatchNorm1d's backward with dynamic=True",
    strict=True,
)


# aot_eager checks capture (no graph break, autograd through the decomposition) across batch
# sizes, uneven batches and train/eval; inductor checks generated code on two batch sizes (each
# inductor compile costs tens of seconds on a 2-core CPU).
@pytest.mark.parametrize(
    ("backend", "steps"),
    [
        ("aot_eager", [(16, True), (10, True), (24, True), (3, False)]),
        pytest.param("inductor", [(16, True), (32, True)], marks=_INDUCTOR_2_7),
    ],
)
def test_compile_fullgraph_batch_sizes(backend: str, steps: list[tuple[int, bool]]) -> None:
    torch._dynamo.reset()
    model = _small_net()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = fxghost.transform(model, 4)
    compiled = torch.compile(gm, fullgraph=True, backend=backend, dynamic=True)
    for step, (n, training) in enumerate(steps):
        compiled.train(training)
        reference.train(training)
        x = torch.randn(n, 3, 5, 3, dtype=torch.float64)
        x1 = x.clone().requires_grad_(training)
        x2 = x.clone().requires_grad_(training)
        y, y_ref = compiled(x1), reference(x2)
        assert_close(y, y_ref, f"step {step}: output")
        if training:
            y.pow(2).sum().backward()
            y_ref.pow(2).sum().backward()
            assert_close(x1.grad, x2.grad, f"step {step}: input grad")
        assert_same_state(model, reference, f"step {step}")
        model.zero_grad()
        reference.zero_grad()


@pytest.mark.skipif(not cpu.available(), reason="no C compiler: the CPU kernels are not built here")
@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_runs_cpu_kernels_as_custom_ops(channels_last: bool) -> None:
    """With backend="cpu", torch.compile gets the C kernels as custom ops (forward and backward)
    for every layer, where "auto" gives inductor the decomposition; the result still matches the
    reference, running statistics included."""
    torch._dynamo.reset()
    model = _small_net()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    backend = RecordGraphs()
    gm = fxghost.transform(model, 4, backend="cpu")
    compiled = torch.compile(gm, fullgraph=True, backend=backend)
    x = torch.randn(10, 3, 5, 3, dtype=torch.float64)  # uneven: a tail ghost batch of 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = compiled(x1), reference(x2)
    assert_close(y, y_ref, "output")
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    assert_close(x1.grad, x2.grad, "input grad")
    assert_same_state(model, reference, "after one step")
    forward = "\n".join(g.code for g in backend.fw_graphs)
    backward = "\n".join(g.code for g in backend.bw_graphs)
    # The BatchNorm2d's main and tail groups with its fused ReLU, and the BatchNorm1d's.
    assert forward.count("fxghost.cpu_ghost_norm_relu.default") == 2
    assert forward.count("fxghost.cpu_ghost_norm.default") == 2
    assert backward.count("fxghost.cpu_ghost_norm_relu_backward.default") == 2
    assert backward.count("fxghost.cpu_ghost_norm_backward.default") == 2
    assert "var_mean" not in forward
    assert {r.backend for r in fxghost.report(gm).rewritten} == {"cpu (custom op, compiled)"}


@pytest.mark.skipif(not cpu.available(), reason="no C compiler: the CPU kernels are not built here")
def test_auto_under_compile_on_cpu_chooses_by_fused_epilogue() -> None:
    """Under torch.compile on the CPU, "auto" runs a layer that ends in a fused ReLU as the
    decomposition (inductor fuses it with its neighbours: whole networks ran faster so) and a
    layer without one in the C kernels' custom op (a layer alone ran faster so)."""
    torch._dynamo.reset()
    gm = fxghost.transform(_small_net(), 4)
    compiled = torch.compile(gm, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(10, 3, 5, 3, dtype=torch.float64)).sum().backward()
    report = fxghost.report(gm)
    assert {r.name: (r.epilogue, r.backend) for r in report.rewritten} == {
        "1": ("relu", "torch (compiled)"),
        "5": ("", "cpu (custom op, compiled)"),
    }
    torch._dynamo.reset()


@pytest.mark.parametrize(("momentum", "affine"), [(0.1, True), (None, True), (0.3, False)])
def test_dynamo_records_each_layer_as_composite_ops(momentum: float | None, affine: bool) -> None:
    """Dynamo's graph holds one normalization node and one running-statistics node per group of
    ghost batches, not their traced-through ops (dynamo's time per layer); AOT autograd then
    expands them, and the step still matches the reference: output, input grad, running
    statistics with an EMA or a cumulative average, with and without affine parameters, over a
    tail ghost batch."""
    torch._dynamo.reset()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), make_bn("2d", momentum=momentum, affine=affine)
    ).double()
    dynamo_graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        dynamo_graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    gm = fxghost.transform(model, 4, backend="torch")
    compiled = torch.compile(gm, fullgraph=True, backend=backend)
    # Uneven: a tail ghost batch of 2.
    run_side_by_side(model, 4, [(10, 3, 5, 3)] * 2, transformed=compiled)
    (graph,) = dynamo_graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count("fxghost.compiled_ghost_norm") == 2  # main and tail groups
    assert targets.count("fxghost.update_running_stats") == 1
    assert not any("var_mean" in t for t in targets)
    torch._dynamo.reset()


def test_compiled_backward_uses_the_saved_statistics() -> None:
    """Under torch.compile the decomposition's backward is BatchNorm's analytic one: no mean or
    variance is recomputed from the input in backward (autograd through var_mean would)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 5), make_bn("1d_NC")).double()
    backend = RecordGraphs()
    gm = fxghost.transform(model, 4, backend="torch")
    compiled = torch.compile(gm, fullgraph=True, backend=backend)
    compiled(torch.randn(16, 6, dtype=torch.float64, requires_grad=True)).sum().backward()
    forward = "\n".join(g.code for g in backend.fw_graphs)
    backward = "\n".join(g.code for g in backend.bw_graphs)
    assert "var_mean" in forward
    assert "var_mean" not in backward and "aten.mean" not in backward


def test_compiled_formulation_gradients() -> None:
    """The analytic backward of the compiled formulation, checked numerically (float64), with
    and without affine parameters."""
    xg = torch.randn(3, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: torch_ops.ghost_norm_compiled(x, w, b, 1e-5)[0], (xg, w, b)
    )
    assert torch.autograd.gradcheck(
        lambda x: torch_ops.ghost_norm_compiled(x, None, None, 1e-5)[0], (xg,)
    )
    y, mean, var = torch_ops.ghost_norm_compiled(xg, w, b, 1e-5)
    y_ref, mean_ref, var_ref = torch_ops.ghost_norm_decomposed(xg, w, b, 1e-5)
    for got, want in ((y, y_ref), (mean, mean_ref), (var, var_ref)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kind", "channels_last"), [("2d", False), ("2d", True), ("3d", True)])
def test_compiled_decomposition_on_conv_inputs(kind: str, channels_last: bool) -> None:
    """The formulation inductor gets for BatchNorm2d/3d: float32, contiguous and channels-last, a
    tail ghost batch, an in-place ReLU after the layer, against the reference. With torch 2.11 a
    no-op dtype cast on its output made dynamo give it a zero gradient."""
    torch._dynamo.reset()
    conv = nn.Conv2d(3, 4, 3, padding=1) if kind == "2d" else nn.Conv3d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, make_bn(kind, dtype=torch.float32), nn.ReLU(inplace=True))
    compiled = torch.compile(fxghost.transform(model, 4), fullgraph=True)
    spatial = (5, 3) if kind == "2d" else (2, 3, 2)
    run_side_by_side(
        model,
        4,
        [(n, 3, *spatial) for n in (12, 9)],
        dtype=torch.float32,
        channels_last=channels_last,
        transformed=compiled,
    )
    torch._dynamo.reset()


@pytest.mark.parametrize("strict", [False, True])
def test_export_traces_through_to_aten_ops(strict: bool) -> None:
    """torch.export of a transformed model in training mode holds aten ops only (the composite
    ops that speed up dynamo under torch.compile are traced through), and the exported program
    trains like the reference: output and running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), make_bn("1d_NC"), nn.ReLU()).double()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    x = torch.randn(16, 6, dtype=torch.float64)
    program = torch.export.export(fxghost.transform(copy.deepcopy(model), 4), (x,), strict=strict)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets and not any("fxghost" in t for t in targets), targets
    exported = program.module()
    assert_close(exported(x), reference(x), "output")
    for (name, got), (_, want) in zip(
        exported.named_buffers(), reference.named_buffers(), strict=True
    ):
        if got.dtype == torch.long:
            assert torch.equal(got, want), f"{name}: {got} != {want}"
        else:
            assert_close(got, want, name)


def test_dynamic_batch_sizes_compile_once() -> None:
    """With ``dynamic=True`` the batch size stays symbolic through the composite ops (their
    integer arguments are SymInts): batch sizes that are multiples of the ghost size share one
    compiled graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), make_bn("2d"), nn.ReLU()).double()
    counter = CompileCounter()
    compiled = torch.compile(fxghost.transform(model, 4), backend=counter, dynamic=True)
    for n in (16, 32, 64):
        compiled(torch.randn(n, 3, 5, 3, dtype=torch.float64)).sum().backward()
    assert counter.frame_count == 1
    torch._dynamo.reset()
