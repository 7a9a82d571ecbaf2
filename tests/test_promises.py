"""Promises of the documentation and of ``transform``'s docstring that no other test holds fxghost
to: empty batches, ``eps`` changed at run time, the tracer options (``concrete_args``,
``autowrap_functions``, a custom tracer with them refused), and a GraphModule passed to
``transform``."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from conftest import BN_SHAPES, input_shape, make_bn, run_side_by_side
from torch import fx, nn

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = list(BN_SHAPES)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys(), what
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{what}: {k} changed"


# ---------------------------------------------------------------------------------------------
# Empty batches (N=0): no ghost batch, in training as in eval: an empty output, nothing updated.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("g", [2, 4])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_empty_training_batch_gives_an_empty_output_and_changes_nothing(
    kind: str, g: int, backend: str
) -> None:
    """As plain BatchNorm: an empty output of the input's shape, differentiable in the input,
    weight and bias (their gradients zeros), running statistics unchanged. And as the chunked
    reference, which counts ghost batches: num_batches_tracked unchanged too, where plain
    BatchNorm adds one. The next, non-empty batch is normalized as usual."""
    model = nn.Sequential(make_bn(kind))
    plain = copy.deepcopy(model).train()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), g).train()
    gm = fxghost.transform(model, g, backend=backend).train()
    before = _state(model)
    outputs = []
    for m in (gm, plain, reference):
        x = torch.empty(input_shape(kind, 0), dtype=torch.float64, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape and y.dtype == x.dtype and y.requires_grad
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        outputs.append([p.grad for p in m.parameters()])
    for got, plain_grad, ref_grad in zip(*outputs, strict=True):
        assert torch.equal(got, torch.zeros_like(got))
        assert torch.equal(got, plain_grad) and torch.equal(got, ref_grad)
    _assert_unchanged(model, before, "after an empty training batch")
    layer_before = {k.removeprefix("0."): v for k, v in before.items()}
    _assert_unchanged(reference[0].bn, layer_before, "the reference after an empty batch")
    assert int(plain[0].num_batches_tracked) == int(before["0.num_batches_tracked"]) + 1
    model.zero_grad(set_to_none=True)
    run_side_by_side(model, g, [input_shape(kind, 8)], transformed=gm)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("track", [True, False], ids=["running_stats", "no_running_stats"])
def test_empty_eval_batch_gives_an_empty_output(kind: str, track: bool) -> None:
    """Eval accepts N=0 with running statistics (plain BatchNorm eval) and without (ghost
    normalization of no ghost batch): an empty output of the input's shape and dtype, a
    backward through it, and nothing updated."""
    model = nn.Sequential(make_bn(kind, track_running_stats=track))
    gm = fxghost.transform(model, 4).eval()
    before = _state(model)
    x = torch.empty(input_shape(kind, 0), dtype=torch.float64, requires_grad=True)
    y = gm(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    _assert_unchanged(model, before, "after an empty eval batch")
    # The next, non-empty batch is normalized as usual.
    model.zero_grad(set_to_none=True)
    run_side_by_side(model, 4, [], [input_shape(kind, 5)], transformed=gm)


# ---------------------------------------------------------------------------------------------
# Run-time flags: eps is read when the graph runs.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["1d_NC", "2d"])
@pytest.mark.parametrize("track", [True, False], ids=["running_stats", "no_running_stats"])
def test_eps_change_at_run_time_is_honoured(dtype: torch.dtype, kind: str, track: bool) -> None:
    """``bn.eps`` changed after ``transform`` takes effect in training and eval without
    re-tracing: the same GraphModule matches a reference built with the new eps. eps=0.5 moves
    each output by several percent (variances are near 1 to 4), far beyond the tolerances."""
    bn = make_bn(kind, dtype=dtype, track_running_stats=track)
    model = nn.Sequential(bn)
    gm = fxghost.transform(model, 4)
    x = torch.randn(input_shape(kind, 8), dtype=dtype)
    y_old = gm.train()(x).detach()
    bn.eps = 0.5
    assert not torch.allclose(gm.train()(x), y_old, rtol=1e-3, atol=1e-3)
    run_side_by_side(
        model,
        4,
        [input_shape(kind, 12), input_shape(kind, 10)],
        [input_shape(kind, 3), input_shape(kind, 9)],
        dtype=dtype,
        transformed=gm,
    )


# ---------------------------------------------------------------------------------------------
# Tracer options.


class FlagNet(nn.Module):
    """A Python branch on an argument: traces only with that argument fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1 = make_bn("2d")
        self.conv = nn.Conv2d(4, 4, 1).double()
        self.bn2 = make_bn("2d")

    def forward(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        x = self.bn1(x)
        if flip:
            x = x.flip(0)
        return self.bn2(self.conv(x))


def squash(x: torch.Tensor) -> torch.Tensor:
    """A Python branch on a tensor value: not traceable, so tracing must record it as a call."""
    peak = x.abs().max()
    if peak > 3:
        return x * (3 / peak)
    return x


class SquashNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn1 = make_bn("2d")
        self.conv = nn.Conv2d(4, 4, 1).double()
        self.bn2 = make_bn("2d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(squash(self.bn1(x) * 2)))


def _traced_whole(result: nn.Module, n_layers: int) -> None:
    """``result`` is one GraphModule with ``n_layers`` BatchNorms ghosted and nothing kept as
    Python (a model that did not trace would come back as a Python copy of itself)."""
    assert isinstance(result, fx.GraphModule), type(result)
    rep = fxghost.report(result)
    assert not rep.untraced, rep.untraced
    assert len(rep.rewritten) == n_layers, rep.table()


def test_concrete_args_are_passed_to_the_tracer() -> None:
    model = FlagNet()
    gm = fxghost.transform(model, 4, concrete_args={"flip": False})
    _traced_whole(gm, 2)
    run_side_by_side(model, 4, [(12, 4, 5, 3), (10, 4, 5, 3)], [(3, 4, 5, 3)], transformed=gm)


def test_autowrap_functions_are_passed_to_the_tracer() -> None:
    model = SquashNet()
    gm = fxghost.transform(model, 4, autowrap_functions=[squash])
    _traced_whole(gm, 2)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(squash) == 1
    # x * 2 after the first layer pushes peaks past 3: squash's branch is taken in the steps.
    run_side_by_side(model, 4, [(12, 4, 5, 3), (10, 4, 5, 3)], [(3, 4, 5, 3)], transformed=gm)


@pytest.mark.parametrize(
    "options",
    [{"leaf_modules": [nn.Conv2d]}, {"autowrap_functions": [squash]}],
    ids=["leaf_modules", "autowrap_functions"],
)
def test_a_custom_tracer_with_tracer_options_is_refused(options: dict[str, list[object]]) -> None:
    """Options for fxghost's tracer cannot apply to a tracer the caller built: ValueError
    rather than silently ignoring them."""
    with pytest.raises(ValueError, match="not both"):
        fxghost.transform(SquashNet(), 4, tracer=fxghost.GhostTracer(), **options)


# ---------------------------------------------------------------------------------------------
# A GraphModule passed to transform is rewritten as it is.


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[type]]:
    """Records every torch.fx trace (fxghost's tracer included: it calls Tracer.trace)."""
    calls: list[type] = []
    original = fx.Tracer.trace

    def trace(self: fx.Tracer, *args: object, **kwargs: object) -> fx.Graph:
        calls.append(type(self))
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fx.Tracer, "trace", trace)
    yield calls


def test_transform_of_a_graph_module_does_not_retrace(traces: list[type]) -> None:
    """A GraphModule the caller traced and edited keeps its graph: the edit (an op inserted by
    hand) and the nodes' ``meta`` survive, no trace runs, and training matches the reference of
    the edited model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), make_bn("2d"), nn.ReLU(), make_bn("2d")).double()
    traced = fx.symbolic_trace(model)
    relu = next(n for n in traced.graph.nodes if n.target == "2")
    relu.meta["mine"] = "kept"
    with traced.graph.inserting_after(relu):
        halved = traced.graph.call_function(torch.mul, (relu, 0.5))
    relu.replace_all_uses_with(halved, delete_user_cb=lambda user: user is not halved)
    traced.recompile()
    traces.clear()

    gm = fxghost.transform(traced, 4)
    assert traces == [], "transform traced again"
    assert isinstance(gm, fx.GraphModule)
    assert len(fxghost.report(gm).rewritten) == 2
    # The ReLU fuses into the BatchNorm before it: the node that stands for its output takes
    # its name and its meta.
    assert [n.meta.get("mine") for n in gm.graph.nodes if n.name == relu.name] == ["kept"]
    assert sum(n.target is torch.mul for n in gm.graph.nodes) == 1
    assert any(n.target == "1" and n.op == "call_module" for n in traced.graph.nodes), (
        "the caller's GraphModule was modified"
    )
    assert list(gm.state_dict()) == list(traced.state_dict())
    # traced shares model's layers, so the reference of the edited model is built from it.
    run_side_by_side(traced, 4, [(12, 3, 5, 3), (10, 3, 5, 3)], [(3, 3, 5, 3)], transformed=gm)
