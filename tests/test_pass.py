"""The graph pass: structure, naming, sharing, selection, idempotence, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, make_bn, run_side_by_side
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxghost
from fxghost import ops
from fxghost.reference import ChunkedGhostBatchNorm, apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, 4)
        self.bn_fc = nn.BatchNorm1d(4)
        self.unused = nn.Linear(2, 2)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv(x)))
        x = self.block(x)
        return self.bn_fc(self.fc(x.mean((2, 3))))


def _net() -> Net:
    return Net().double()


def test_graph_structure_names_and_meta() -> None:
    # The unfused structure: with fusion, bn1 and block.1 end at their ReLUs (test_epilogue).
    gm = fxghost.transform(_net(), ghost_batch_size=8, fuse_epilogues=False)
    names = [n.name for n in gm.graph.nodes]
    for base in ("bn1", "block_1", "bn_fc"):
        for suffix in ("_layer", "_ghost_view", "_ghost_norm", ""):
            assert base + suffix in names
    by_name = {n.name: n for n in gm.graph.nodes}
    view = by_name["block_1_ghost_view"]
    assert view.target is ops.ghost_view
    assert view.meta["fxghost"] == {
        "source_layer": "block.1",
        "layer_type": "BatchNorm2d",
        "ghost_batch_size": 8,
        "step": "view",
    }
    assert by_name["block_1_ghost_norm"].meta["fxghost"]["step"] == "normalize"
    assert by_name["block_1"].target is ops.ghost_unview
    assert not any(n.op == "call_module" and "bn" in str(n.target) for n in gm.graph.nodes)
    assert "fxghost_ops_ghost_norm(block_1_ghost_view" in gm.code
    assert repr(ops.ghost_norm) == "fxghost.ops.ghost_norm"


def test_report_lists_rewritten_layers() -> None:
    gm = fxghost.transform(_net(), ghost_batch_size=8)
    rep = fxghost.report(gm)
    assert rep.rewritten_names == ["bn1", "block.1", "bn_fc"]
    assert rep.skipped == []
    table = rep.table()
    assert "block.1" in table and "BatchNorm1d" in table and "rewritten" in table


class _MyBN(nn.BatchNorm2d):
    pass


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d

        self.plain = nn.BatchNorm2d(3)
        self.sync = nn.SyncBatchNorm(3)
        self.sub = _MyBN(3)
        self.frozen = FrozenBatchNorm2d(3)
        self.lazy = nn.LazyBatchNorm2d()
        self.inst = nn.InstanceNorm2d(3)
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.plain(x)
        x = self.frozen(x)
        x = self.inst(x)
        x = F.batch_norm(x, None, None, self.w, None, True)
        return self.lazy(self.sync(x + self.sub(x)))


def test_skipped_layers_are_reported_with_reasons() -> None:
    model = Mixed()
    gm = fxghost.transform(model, ghost_batch_size=2)
    rep = fxghost.report(gm)
    assert rep.rewritten_names == ["plain"]
    reasons = {r.name: r.reason for r in rep.skipped}
    assert "SyncBatchNorm" in reasons["sync"]
    assert "lazy" in reasons["lazy"]
    assert "frozen" in reasons["frozen"]
    assert "subclass" in reasons["sub"] or "traced into" in reasons["sub"]
    assert any("functional" in reason for reason in reasons.values())
    assert "inst" not in reasons  # InstanceNorm is not BatchNorm
    # The skipped layers still compute exactly as before.
    x = torch.randn(4, 3, 5, 5)
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))


def test_only_rewrites_selected_layers_and_rejects_typos() -> None:
    model = _net()
    gm = fxghost.transform(model, 4, only=["block.*"])
    rep = fxghost.report(gm)
    assert rep.rewritten_names == ["block.1"]
    assert {r.name for r in rep.skipped} == {"bn1", "bn_fc"}
    assert "not selected" in rep.skipped[0].reason
    # Only block.1 is ghost: compare against a reference that wraps only block.1.
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4, only="block.1")
    x = torch.randn(12, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(gm(x), reference(x))
    with pytest.raises(ValueError, match="matches no rewritable BatchNorm.*bn_fc"):
        fxghost.transform(model, 4, only=["blok.1"])


def test_op_count_is_independent_of_chunk_count() -> None:
    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    bn = nn.BatchNorm2d(4)
    gm = fxghost.transform(nn.Sequential(bn), ghost_batch_size=16)
    counts = []
    for n in (64, 1024):
        x = torch.randn(n, 4, 3, 3, requires_grad=True)
        gm(x).sum().backward()  # steady state: per-shape constants (EMA weights) are cached
        with Count() as mode:
            gm(x).sum().backward()
        counts.append(len(mode.ops))
    assert counts[0] == counts[1], counts
    # The reference, by contrast, grows with the number of chunks.
    ref = ChunkedGhostBatchNorm(nn.BatchNorm2d(4), 16)
    ref_counts = []
    for n in (64, 1024):
        with Count() as mode:
            ref(torch.randn(n, 4, 3, 3, requires_grad=True)).sum().backward()
        ref_counts.append(len(mode.ops))
    assert ref_counts[1] > ref_counts[0]


def test_train_eval_switch_and_batch_size_not_baked_in() -> None:
    model = _net()
    gm = fxghost.transform(model, 8)
    run_side_by_side(
        model,
        8,
        [(256 // 8, 3, 4, 4), (80 // 8, 3, 4, 4), (24, 3, 4, 4)],
        [(3, 3, 4, 4), (40, 3, 4, 4)],
        transformed=gm,
    )
    gm.train()
    run_side_by_side(model, 8, [(16, 3, 4, 4)], [(1, 3, 4, 4)], transformed=gm)


def test_parameters_and_buffers_are_shared_and_state_dicts_match() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = fxghost.transform(model, 4)
    assert set(gm.state_dict()) == set(model.state_dict())
    assert gm.bn1.weight is model.bn1.weight
    assert gm.bn1.running_mean is model.bn1.running_mean
    before = model.bn1.weight.detach().clone()
    loss = gm(torch.randn(8, 3, 5, 5, dtype=torch.float64)).pow(2).sum()
    loss.backward()
    opt.step()
    assert not torch.equal(model.bn1.weight, before)  # the optimizer built before still works
    assert int(model.bn1.num_batches_tracked) == 2  # the original holds the statistics
    fresh = _net()
    fresh.load_state_dict(gm.state_dict(), strict=True)
    gm2 = fxghost.transform(_net(), 4)
    gm2.load_state_dict(model.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
        assert torch.equal(gm2.state_dict()[key], value)


def test_input_model_is_left_untouched() -> None:
    model = _net().eval()
    modules_before = [(n, type(m), m.training) for n, m in model.named_modules()]
    state_before = copy.deepcopy(model.state_dict())
    gm = fxghost.transform(model, 4)
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == modules_before
    assert gm.training is False
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key])


def test_idempotent_and_no_batchnorm_is_unchanged() -> None:
    gm = fxghost.transform(_net(), 4)
    again = fxghost.ghost_batchnorm_pass(gm, 4)
    assert again.code == gm.code
    rep = fxghost.report(again)
    assert rep.rewritten_names == fxghost.report(gm).rewritten_names
    assert all(r.reason == "" and r.ghost_batch_size == 4 for r in rep.rewritten)
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.LayerNorm(3))
    assert fxghost.transform(plain, 4).code == torch.fx.symbolic_trace(plain).code
    assert fxghost.report(fxghost.transform(plain, 4)).layers == []


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        out += x  # as torchvision's ResNet blocks write it
        out *= self.scale
        out -= 1.0
        out /= 2.0
        return torch.relu(out)


def test_augmented_assignments_stay_in_place() -> None:
    """Plain FX turns ``out += x`` into ``out = out + x`` (a new activation per residual add);
    fxghost's tracer keeps the in-place operators the model wrote, with the same results."""
    import operator

    model = _Residual().double()
    gm = fxghost.transform(model, 4)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for op in (operator.iadd, operator.imul, operator.isub, operator.itruediv):
        assert targets.count(op) == 1, op
    assert "out += x" not in gm.code and "+= x" in gm.code
    # The in-place chain writes into the BatchNorm output itself: keep a handle on it.
    bn_out: list[torch.Tensor] = []
    real_unview = ops.ghost_unview.fn

    def keep(*args: object) -> torch.Tensor:
        bn_out.append(real_unview(*args))
        return bn_out[-1]

    gm.eval()
    ops.ghost_unview.fn = keep
    try:
        with torch.no_grad():
            y = gm(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    finally:
        ops.ghost_unview.fn = real_unview
    assert torch.equal(torch.relu(bn_out[0]), y)
    run_side_by_side(model, 4, [(12, 3, 4, 4), (10, 3, 4, 4)], [(2, 3, 4, 4)])


def test_pass_on_existing_graph_module_does_not_mutate_it() -> None:
    model = _net()
    traced = torch.fx.symbolic_trace(model)
    code = traced.code
    gm = fxghost.ghost_batchnorm_pass(traced, 4)
    assert traced.code == code
    assert gm.code != code
    with pytest.raises(TypeError, match="GraphModule"):
        fxghost.ghost_batchnorm_pass(model, 4)  # type: ignore[arg-type]


def test_retrace_keeps_the_ghost_ops_as_leaves() -> None:
    model = _net()
    gm = fxghost.transform(model, 4)
    retraced = torch.fx.symbolic_trace(gm)
    targets = [n.target for n in retraced.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.ghost_norm) == 3
    norm = next(n for n in retraced.graph.nodes if n.target is ops.ghost_norm)
    assert norm.name == "bn1_ghost_norm"
    assert norm.meta["fxghost"]["source_layer"] == "bn1"
    run_side_by_side(model, 4, [(12, 3, 4, 4)], [(2, 3, 4, 4)], transformed=retraced)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "32", None, True, 32.0])
def test_bad_ghost_batch_size(bad: object) -> None:
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        fxghost.transform(_net(), bad)  # type: ignore[arg-type]


def test_numpy_style_integers_are_accepted() -> None:
    gm = fxghost.transform(_net(), torch.tensor(4).item())
    assert fxghost.report(gm).ghost_batch_size == 4


def _error_pair(make_input, g: int = 4, training: bool = True, kind: str = "2d"):  # type: ignore[no-untyped-def]
    """The errors (type, message) fxghost and the reference raise, and the state afterwards."""
    model = nn.Sequential(make_bn(kind))
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), g)
    gm = fxghost.transform(model, g)
    gm.train(training)
    reference.train(training)
    state = copy.deepcopy(model.state_dict())
    errors = []
    for m in (gm, reference):
        with pytest.raises(ValueError) as info:
            m(make_input())
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed by a failing call"
    return errors[0]


def test_error_batch_smaller_than_ghost_size() -> None:
    msg = _error_pair(lambda: torch.randn(3, 4, 5, 3, dtype=torch.float64), g=4)
    assert "layer '0'" in msg and "N=3" in msg and "ghost_batch_size=4" in msg
    assert "drop_last" in msg


def test_error_single_value_per_channel() -> None:
    msg = _error_pair(lambda: torch.randn(13, 5, dtype=torch.float64), g=4, kind="1d_NC")
    assert "N=13" in msg and "ghost_batch_size=4" in msg and "single value per channel" in msg


def test_error_wrong_channels_and_dims() -> None:
    msg = _error_pair(lambda: torch.randn(8, 3, 5, 3, dtype=torch.float64))
    assert "num_features=4" in msg and "3 channels" in msg
    msg = _error_pair(lambda: torch.randn(8, 4, 5, dtype=torch.float64))
    assert "expected 4D input" in msg


def test_eval_accepts_any_batch_size() -> None:
    model = nn.Sequential(make_bn("2d"))
    gm = fxghost.transform(model, 32).eval()
    for n in (1, 2, 31):
        x = torch.randn(n, 4, 5, 3, dtype=torch.float64)
        torch.testing.assert_close(gm(x), model.eval()(x))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing cannot follow it
            x = x * 2
        return self.bn(x)


def test_untraceable_model_gets_an_actionable_error_when_strict() -> None:
    with pytest.raises(fxghost.TracingError) as info:
        fxghost.transform(_Branchy(), 4, strict=True)
    msg = str(info.value)
    assert "_Branchy" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules" in msg and "ghost_batchnorm_pass" in msg
    assert info.value.location is not None and "test_pass.py" in info.value.location


def test_leaf_modules_and_custom_tracer() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _Branchy()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.inner(x))

    model = Outer().double()
    gm = fxghost.transform(model, 4, leaf_modules=[_Branchy])
    rep = fxghost.report(gm)
    # The leaf stays a black box in the graph; its BatchNorm is ghosted on its own.
    assert rep.rewritten_names == ["inner.bn", "bn"]
    assert rep.skipped == []
    assert any(n.op == "call_module" and n.target == "inner" for n in gm.graph.nodes)
    assert isinstance(gm.inner, _Branchy) and gm.inner is not model.inner
    assert isinstance(gm.inner.bn, torch.fx.GraphModule) and type(model.inner.bn) is nn.BatchNorm1d
    assert [p.name for p in rep.untraced] == ["inner"]
    gm2 = fxghost.transform(model, 4, tracer=fxghost.GhostTracer(leaf_modules=["inner"]))
    assert fxghost.report(gm2).rewritten_names == ["inner.bn", "bn"]
    run_side_by_side(model, 4, [(12, 3), (10, 3)], [(3, 3)], transformed=gm)


class _BranchyBlocks(nn.Module):
    """Data-dependent control flow between BatchNorm blocks (which themselves trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        if x.mean() > 0.3:
            x = x * 2
        return self.head(self.block2(x))


def test_untraceable_model_rewrites_its_traceable_submodules() -> None:
    model = _BranchyBlocks().double()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [type(m) for m in model.modules()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer is ghosted: nothing to warn about
        result = fxghost.transform(model, 4)
    assert not isinstance(result, torch.fx.GraphModule)
    assert isinstance(result.block1, torch.fx.GraphModule)
    assert isinstance(result.block2, torch.fx.GraphModule)
    # Called directly by untraceable code: ghosted on its own, with the layer's own state.
    assert isinstance(result.head, torch.fx.GraphModule)
    assert list(result.head.state_dict()) == list(model.head.state_dict())
    assert [type(m) for m in model.modules()] == types_before  # the caller's model is untouched
    assert list(result.state_dict()) == list(model.state_dict())
    rep = fxghost.report(result)
    assert rep.rewritten_names == ["block1.1", "block2.1", "head"]
    assert rep.skipped == []
    assert [p.name for p in rep.untraced] == ["(root)"]
    assert "test_pass.py" in (rep.untraced[0].location or "")
    assert "not traced: (root)" in rep.summary()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key])
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    for n, training in ((12, True), (10, True), (2, False)):
        result.train(training)
        reference.train(training)
        x = torch.randn(n, 3, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(result(x), reference(x))
        assert_same_state(model, reference, f"N={n}")


def test_register_batchnorm_extension_point() -> None:
    class BNAct(nn.BatchNorm2d):
        def __init__(self, n: int) -> None:
            super().__init__(n)
            self.drop = nn.Identity()
            self.act = nn.Hardswish()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.drop(super().forward(x)))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BNAct(4)).double()
    assert fxghost.report(fxghost.transform(model, 4)).rewritten_names == []  # unknown subclass
    fxghost.register_batchnorm(BNAct, after=("drop", "act"))
    gm = fxghost.transform(model, 4)
    assert fxghost.report(gm).rewritten_names == ["1"]
    nodes = [n.name for n in gm.graph.nodes]
    assert nodes[-3:] == ["_1_ghost_unview", "_1", "output"]  # Identity drop is not emitted
    assert "_1_ghost_norm" in nodes
    run_side_by_side(model, 4, [(12, 3, 4, 4), (9, 3, 4, 4)], [(2, 3, 4, 4)], transformed=gm)
    with pytest.raises(TypeError, match="subclass of nn.BatchNorm"):
        fxghost.register_batchnorm(nn.LayerNorm)  # type: ignore[arg-type]


class _TrainingBranch(nn.Module):
    """A forward that branches on self.training outside BatchNorm (as timm heads do)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.bn(x), p=0.5, training=self.training)
        if self.training:
            x = x + 1
        return self.fc(x)


def test_forward_branching_on_training_gets_one_graph_per_mode() -> None:
    model = _TrainingBranch().double().eval()
    gm = fxghost.transform(model, 4)
    assert model.training is False and gm.training is False  # modes left as they were
    assert "training = True" in gm.train_graph.python_code("self").src  # type: ignore[operator]
    assert "training = False" in gm.code
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(gm(x), model(x))  # eval: no dropout, no +1
    gm.train()
    model.train()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    x = torch.randn(8, 6, dtype=torch.float64)
    torch.manual_seed(3)
    y = gm(x)
    torch.manual_seed(3)
    torch.testing.assert_close(y, reference(x))
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x[:2]), model(x[:2]))
    copied = copy.deepcopy(gm)
    copied.train()
    assert "training = True" in copied.code
    retraced = torch.fx.symbolic_trace(gm)  # re-tracing sees the current mode's graph
    assert "training = False" in retraced.code


def _autograd_node_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("n", [8, 10])  # without and with a tail ghost batch
def test_inplace_relu_after_a_rewritten_layer_costs_no_copy(n: int) -> None:
    """The rewritten layer's output is not a view: ReLU(inplace=True) on a view would make
    autograd insert CopySlices, which clones the whole gradient in backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    gm = fxghost.transform(model, ghost_batch_size=4)
    names = _autograd_node_names(gm(torch.randn(n, 3, 5, 5)))
    assert "CopySlices" not in names, names
