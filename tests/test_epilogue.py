"""Fused epilogues: BatchNorm -> ReLU and BatchNorm -> add -> ReLU become one ``ghost_norm`` node
(``transform(fuse_epilogues=True)``, the default), which gives the unfused graph's results; also
through pass-through ``nn.Identity`` calls between them (timm's ``drop_block``)."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import run_side_by_side
from torch import fx, nn

import fxghost
from fxghost import ops
from fxghost._graph_module import DualGraphModule, mode_graphs
from fxghost.backends import _common, cpu

pytestmark = pytest.mark.usefixtures("one_thread")

G = 4
TRAIN = [(12, 3, 5, 5), (10, 3, 5, 5)]  # divisible, and a tail ghost batch of 2
EVAL = [(3, 3, 5, 5)]


@pytest.fixture(
    params=[
        pytest.param(
            "auto", marks=pytest.mark.skipif(not cpu.available(), reason="no C compiler here")
        ),
        "torch",
    ],
)
def backend(request: pytest.FixtureRequest) -> str:
    """The CPU kernels where they take the input, and the torch ops."""
    return str(request.param)


class BnRelu(nn.Module):
    """conv -> BatchNorm -> a ReLU written as ``how`` says."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=how == "module_inplace")
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.how in ("module", "module_inplace"):
            y = self.relu(y)
        elif self.how == "F.relu":
            y = F.relu(y)
        elif self.how == "F.relu_inplace":
            y = F.relu(y, inplace=True)
        elif self.how == "torch.relu":
            y = torch.relu(y)
        elif self.how == "torch.relu_":
            y = torch.relu_(y)
        else:
            y = y.relu_()
        return self.head(y)


RELUS = ["module", "module_inplace", "F.relu", "F.relu_inplace", "torch.relu", "torch.relu_"]
RELUS += ["method"]


class Block(nn.Module):
    """A ResNet BasicBlock whose residual add is written as ``how`` says; its shortcut a conv and
    a BatchNorm, computed after ``bn2`` in graph order as torchvision's is, or the input."""

    def __init__(self, how: str, downsample: bool, channels: int = 4) -> None:
        super().__init__()
        self.how = how
        # No bias before a BatchNorm (as in ResNets): its gradient is zero up to rounding.
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.downsample = (
            nn.Sequential(nn.Conv2d(channels, 4, 1, bias=False), nn.BatchNorm2d(4))
            if downsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.how == "iadd":
            out += identity
        elif self.how == "add":
            out = out + identity
        elif self.how == "radd":
            out = identity + out
        else:
            out = torch.add(out, identity)
        return self.relu(out)


ADDS = ["iadd", "add", "radd", "torch.add"]


def res_net(how: str = "iadd") -> nn.Module:
    """Two blocks: the first with a conv shortcut, the second with the identity."""
    return nn.Sequential(Block(how, downsample=True, channels=3), Block(how, downsample=False))


class BnIdentityRelu(nn.Module):
    """conv -> BatchNorm -> ``nn.Identity`` calls (one, or two) -> a ReLU module or function."""

    def __init__(self, identities: int, module_relu: bool) -> None:
        super().__init__()
        self.module_relu = module_relu
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drops = nn.Sequential(*(nn.Identity() for _ in range(identities)))
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        for drop in self.drops:
            y = drop(y)
        return self.head(self.relu(y) if self.module_relu else torch.relu(y))


class IdentityBlock(nn.Module):
    """A BasicBlock with ``nn.Identity`` calls as timm's have them, and more: ``drop_block``
    between ``bn1`` and the ReLU, ``drop_path`` between ``bn2`` and the add, ``post`` between the
    add and the ReLU, and ``short_drop`` on the shortcut (a conv and a BatchNorm, computed after
    ``bn2``); the add written as ``how`` says."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop_block = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop_path = nn.Identity()
        self.post = nn.Identity()
        self.downsample = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.short_drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.drop_block(self.bn1(self.conv1(x))))
        out = self.drop_path(self.bn2(self.conv2(out)))
        identity = self.short_drop(self.downsample(x))
        if self.how == "iadd":
            out += identity
        elif self.how == "add":
            out = out + identity
        else:  # both operands reach a BatchNorm through an nn.Identity: the first one fuses
            out = identity + out
        return self.relu(self.post(out))


IDENTITY_ADDS = ["iadd", "add", "radd"]


def norm_nodes(gm: nn.Module) -> dict[str, fx.Node]:
    """Each ``ghost_norm`` node of ``gm``'s graph, by layer."""
    return {str(n.args[3]): n for n in gm.graph.nodes if n.target is ops.ghost_norm}


def epilogues(gm: nn.Module) -> dict[str, str | None]:
    return {name: n.kwargs.get("epilogue") for name, n in norm_nodes(gm).items()}


_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def relus_and_adds(gm: nn.Module) -> list[str]:
    """The names of the ReLU and add nodes left in ``gm``'s graph."""
    left = []
    for n in gm.graph.nodes:
        if (
            (n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.ReLU))
            or (n.op == "call_function" and n.target in (*_RELU_FUNCTIONS, *_ADD_FUNCTIONS))
            or (n.op == "call_method" and n.target in ("relu", "relu_", "add", "add_"))
        ):
            left.append(n.name)
    return left


@pytest.mark.parametrize("how", RELUS)
def test_bn_relu_fuses_and_matches_reference(how: str, backend: str) -> None:
    torch.manual_seed(0)
    model = BnRelu(how).double()
    gm = fxghost.transform(model, G, backend=backend)
    assert epilogues(gm) == {"bn": "relu"}
    assert relus_and_adds(gm) == []
    norm = norm_nodes(gm)["bn"]
    steps = norm.kwargs.get("epilogue_steps")
    if how.startswith("module"):
        assert [s.target for s in steps] == ["relu"]
    else:
        assert steps is None
    assert "residual" not in norm.kwargs
    run_side_by_side(model, G, TRAIN, EVAL, transformed=gm)


@pytest.mark.parametrize("how", ADDS)
def test_bn_add_relu_fuses_and_matches_reference(how: str, backend: str) -> None:
    """Outputs, input gradients, every parameter's gradient (the shortcut's too), running
    statistics and num_batches_tracked, through steps with and without a tail, then eval."""
    torch.manual_seed(0)
    model = res_net(how).double()
    gm = fxghost.transform(model, G, backend=backend)
    # Where both operands are BatchNorms (the first block's shortcut is one), the first fuses.
    fused, other = ("0.downsample.1", "0.bn2") if how == "radd" else ("0.bn2", "0.downsample.1")
    assert epilogues(gm) == {
        "0.bn1": "relu",
        fused: "add_relu",
        other: None,
        "1.bn1": "relu",
        "1.bn2": "add_relu",
    }
    assert relus_and_adds(gm) == []
    nodes = norm_nodes(gm)
    residual = nodes[fused].kwargs["residual"]
    assert residual.target is ops.ghost_unview and residual.args[1] == other
    assert nodes[fused].kwargs.get("add_inplace", False) == (how == "iadd")
    # The last node of a fused subgraph takes the ReLU's name: the code after it reads the same.
    unfused = fxghost.transform(copy.deepcopy(model), G, fuse_epilogues=False)
    last = {n.name for n in gm.graph.nodes}
    assert {
        n.name for n in unfused.graph.nodes if n.op == "call_module" and "relu" in n.name
    } <= last
    meta = nodes[fused].meta["fxghost"]
    assert meta["epilogue"] == "add_relu" and meta["step"] == "normalize"
    assert len(meta["fused"]) == 2 and meta["fused"][-1] == "_0_relu_1"
    run_side_by_side(model, G, TRAIN, EVAL, transformed=gm)


def steps_of(norm: fx.Node) -> list[str] | None:
    """A ``ghost_norm`` node's ``epilogue_steps``: each module's target, or the op's name."""
    steps = norm.kwargs.get("epilogue_steps")
    return None if steps is None else [s if isinstance(s, str) else s.target for s in steps]


def module_calls(gm: nn.Module) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("module_relu", [True, False], ids=["nn.ReLU", "torch.relu"])
@pytest.mark.parametrize("identities", [1, 2])
def test_bn_identity_relu_fuses_and_matches_reference(
    identities: int, module_relu: bool, backend: str
) -> None:
    """BatchNorm -> nn.Identity (one, or a chain) -> ReLU fuses; the node holds the Identity
    modules, which stay the model's, and its meta names them among the nodes it replaced."""
    torch.manual_seed(0)
    model = BnIdentityRelu(identities, module_relu).double()
    gm = fxghost.transform(model, G, backend=backend)
    assert epilogues(gm) == {"bn": "relu"}
    assert module_calls(gm) == ["conv", "head"]
    drops = [f"drops.{i}" for i in range(identities)]
    norm = norm_nodes(gm)["bn"]
    assert steps_of(norm) == [*drops, "relu"]
    assert isinstance(norm.kwargs["epilogue_steps"][-1], str) != module_relu
    assert all(gm.get_submodule(d) is model.get_submodule(d) for d in drops)
    fused = norm.meta["fxghost"]["fused"]
    assert fused == [*(d.replace(".", "_") for d in drops), "relu"]
    assert fxghost.report(gm).layers[0].epilogue == "relu"
    run_side_by_side(model, G, TRAIN, EVAL, transformed=gm)


@pytest.mark.parametrize("how", IDENTITY_ADDS)
def test_bn_identity_add_identity_relu_fuses_and_matches_reference(how: str, backend: str) -> None:
    """BatchNorm -> nn.Identity -> add -> nn.Identity -> ReLU fuses, the first operand's chain
    (``radd``: the shortcut's BatchNorm through ``short_drop``) where both lead to a
    BatchNorm."""
    torch.manual_seed(0)
    model = IdentityBlock(how).double()
    gm = fxghost.transform(model, G, backend=backend)
    fused, other, before = ("bn2", "downsample.1", "drop_path")
    if how == "radd":
        fused, other, before = ("downsample.1", "bn2", "short_drop")
    assert epilogues(gm) == {"bn1": "relu", fused: "add_relu", other: None}
    assert relus_and_adds(gm) == []
    left = {"drop_path", "short_drop"} - {before}
    assert [c for c in module_calls(gm) if "drop" in c or c == "post"] == sorted(left)
    nodes = norm_nodes(gm)
    assert steps_of(nodes["bn1"]) == ["drop_block", "relu"]
    assert steps_of(nodes[fused]) == [before, "add", "post", "relu"]
    assert nodes[fused].kwargs.get("add_inplace", False) == (how == "iadd")
    assert nodes[fused].meta["fxghost"]["fused"][0] == before
    assert nodes[fused].meta["fxghost"]["fused"][2:] == ["post", "relu_1"]
    for name in ("drop_block", "drop_path", "post", "short_drop"):
        assert getattr(gm, name) is getattr(model, name)
    run_side_by_side(model, G, TRAIN, EVAL, transformed=gm)


@pytest.mark.parametrize(("make", "what"), [(lambda: BnRelu("module"), "relu"), (res_net, "add")])
def test_float32_matches_reference(make: Callable[[], nn.Module], what: str, backend: str) -> None:
    torch.manual_seed(0)
    model = make()
    gm = fxghost.transform(model, G, backend=backend)
    assert any(e is not None for e in epilogues(gm).values()), what
    run_side_by_side(model, G, TRAIN, EVAL, transformed=gm, dtype=torch.float32)


def _step(
    gm: nn.Module, x: torch.Tensor, training: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One call of ``gm`` on ``x``, and in training a backward from a gradient that depends on
    the output's shape alone (the same for two models of the same shapes)."""
    gm.train(training)
    x = x.clone().requires_grad_(training)
    y = gm(x)
    if training:
        gen = torch.Generator().manual_seed(y.numel())
        y.backward(torch.randn(y.shape, generator=gen, dtype=y.dtype))
    return y.detach(), x.grad


def assert_same_as_unfused(
    model: nn.Module,
    fused: nn.Module,
    twin: nn.Module,
    unfused: nn.Module,
    steps: list[tuple[tuple[int, ...], bool]],
    dtype: torch.dtype = torch.float64,
) -> None:
    """``fused`` (of ``model``) and ``unfused`` (of ``twin``, a copy of it) compute the same, bit
    for bit, at each ``(shape, training)`` step: outputs, input and parameter gradients, running
    statistics and num_batches_tracked."""
    gen = torch.Generator().manual_seed(1)
    for shape, training in steps:
        x = torch.randn(shape, generator=gen, dtype=dtype)
        y1, g1 = _step(fused, x, training)
        y2, g2 = _step(unfused, x, training)
        assert torch.equal(y1, y2), shape
        assert (g1 is None and g2 is None) or torch.equal(g1, g2), shape
        for (name, a), b in zip(
            model.state_dict().items(), twin.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"{shape}: {name}"
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)


BITWISE_STEPS = [*((s, True) for s in TRAIN), ((0, 3, 5, 5), True), (EVAL[0], False)]


@pytest.mark.parametrize(
    "make", [res_net, lambda: IdentityBlock("iadd")], ids=["plain", "identity"]
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_is_bitwise_the_unfused_graph(
    make: Callable[[], nn.Module], dtype: torch.dtype, backend: str
) -> None:
    """The fused graph computes what the unfused one does, bit for bit: outputs, gradients and
    running statistics, with a tail, in eval, and for a batch without samples."""
    torch.manual_seed(0)
    model = make().to(dtype)
    twin = copy.deepcopy(model)
    fused = fxghost.transform(model, G, backend=backend)
    unfused = fxghost.transform(twin, G, backend=backend, fuse_epilogues=False)
    assert any(norm.kwargs.get("epilogue") for norm in norm_nodes(fused).values())
    assert not any(norm.kwargs.get("epilogue") for norm in norm_nodes(unfused).values())
    assert_same_as_unfused(model, fused, twin, unfused, BITWISE_STEPS, dtype)


def test_torchvision_resnet18_fuses_every_block() -> None:
    torchvision = pytest.importorskip("torchvision")
    gm = fxghost.transform(torchvision.models.resnet18(num_classes=3), 8)
    found = epilogues(gm)
    assert len(found) == 20
    for name, epilogue in found.items():
        expected = None if "downsample" in name else "add_relu" if name.endswith("bn2") else "relu"
        assert epilogue == expected, name
    assert sum(e == "add_relu" for e in found.values()) == 8
    assert relus_and_adds(gm) == []
    rows = {r["layer"]: r for r in fxghost.report(gm).rows()}
    assert rows["layer1.0.bn2"]["epilogue"] == "add+relu"
    assert rows["layer1.0.bn1"]["epilogue"] == "relu"
    assert rows["layer2.0.downsample.1"]["epilogue"] == ""


# timm's ResNets: the report's epilogue of the stem's bn1 and of each block's BatchNorms, but the
# shortcuts'. BasicBlock: bn1 -> drop_block -> act1, bn2 -> add -> act2; Bottleneck: bn2 ->
# drop_block -> act2, bn3 -> add -> act3. (drop_path is None, or a DropPath: no nn.Identity.)
TIMM_RESNETS = {
    "resnet18": {"bn1": "relu", "bn2": "add+relu"},
    "resnet50": {"bn1": "relu", "bn2": "relu", "bn3": "add+relu"},
}
# 16 pixels (1x1 in layer4) keep resnet50's steps in float64 under a second.
TIMM_PIXELS = 16


@pytest.mark.parametrize("arch", TIMM_RESNETS)
def test_timm_resnets_fuse_every_block(arch: str) -> None:
    """timm's blocks call ``drop_block`` (an ``nn.Identity`` by default) between a BatchNorm and
    its ReLU: it fuses with them, so every BatchNorm followed by a ReLU fuses (only the
    shortcuts' do not, which the add reads). The Identity stays the model's, where it was, and a
    hook registered on it later fires; the results are the unfused graph's, bit for bit."""
    timm = pytest.importorskip("timm")
    labels, pixels = TIMM_RESNETS[arch], TIMM_PIXELS
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3).double()
    twin = copy.deepcopy(model)
    gm = fxghost.transform(model, G)
    rows = fxghost.report(gm).rows()
    for row in rows:
        name = str(row["layer"])
        expected = "" if "downsample" in name else labels[name.rsplit(".", 1)[-1]]
        assert row["epilogue"] == expected, name
    assert sum(not r["epilogue"] for r in rows) == (3 if arch == "resnet18" else 4)
    assert relus_and_adds(gm) == []
    drop_blocks = [n for n in gm.graph.nodes if str(n.target).endswith("drop_block")]
    assert drop_blocks and all(n.op == "get_attr" for n in drop_blocks)
    assert gm.layer1[0].drop_block is model.layer1[0].drop_block
    steps = [((8, 3, pixels, pixels), True), ((3, 3, pixels, pixels), False)]
    assert_same_as_unfused(model, gm, twin, fxghost.transform(twin, G, fuse_epilogues=False), steps)
    seen: list[torch.Tensor] = []
    # A copy: act1, in place, then writes into what drop_block passed on.
    hook = model.layer1[0].drop_block.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].clone())
    )
    gm.train()(torch.randn(8, 3, pixels, pixels, dtype=torch.float64))
    hook.remove()
    assert len(seen) == 1 and bool((seen[0] < 0).any())  # the BatchNorm's output, pre-ReLU


class SubIdentity(nn.Identity):
    """An ``nn.Identity`` subclass: its forward may do anything, so it is no pass-through."""


class TwoUses(nn.Module):
    """Patterns that must stay unfused, chosen by ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.LeakyReLU() if how == "leaky" else nn.GELU() if how == "gelu" else nn.ReLU()
        self.drop = SubIdentity() if how == "identity_subclass" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.how == "bn_twice":  # the BatchNorm's output has another use
            return self.act(y) + y
        if self.how == "identity_twice":  # the Identity's output has another use
            d = self.drop(y)
            return self.act(d) + d
        if self.how == "identity_subclass":
            return self.act(self.drop(y))
        if self.how == "identity_after_add_twice":  # so has the add's, through the Identity
            s = self.drop(y + x)
            return self.act(s) * s
        if self.how == "identity_on_the_residual_only":  # y is no operand of the add
            return self.act(self.drop(x) + y * 2.0)
        if self.how == "add_twice":  # the add's output has another use
            s = y + x
            return self.act(s) * s
        if self.how == "residual_inplace":  # the add writes into the residual
            x = x * 1.0
            x += y
            return self.act(x)
        if self.how == "alpha":
            return self.act(torch.add(y, x, alpha=2))
        if self.how == "constant":
            return self.act(y + 1.0)
        return self.act(y)


UNFUSED = ["bn_twice", "add_twice", "residual_inplace", "alpha", "constant", "leaky", "gelu"]
UNFUSED += ["identity_twice", "identity_subclass", "identity_after_add_twice"]
UNFUSED += ["identity_on_the_residual_only"]


@pytest.mark.parametrize("how", UNFUSED)
def test_other_patterns_stay_unfused(how: str) -> None:
    torch.manual_seed(0)
    model = TwoUses(how).double()
    # A leaf, SubIdentity stays a module call (traced into, it would be no call at all).
    gm = fxghost.transform(model, G, leaf_modules=[SubIdentity])
    assert epilogues(gm) == {"bn": None}
    assert fxghost.report(gm).layers[0].epilogue == ""
    shape = [(12, 3, 2, 2), (10, 3, 2, 2)]
    run_side_by_side(model, G, shape, [(3, 3, 2, 2)], transformed=gm)


class Shared(nn.Module):
    """One BatchNorm called three times: its running statistics depend on the order."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(x)  # its add comes after the next call of the same layer: not fused
        b = self.bn(x * 2.0)  # fused with the add and the ReLU (a is its residual)
        return torch.sigmoid(self.bn(torch.relu(a + b)))  # not fused: a sigmoid


def test_a_layer_called_again_before_the_add_is_not_moved_past_that_call() -> None:
    torch.manual_seed(0)
    model = Shared().double()
    gm = fxghost.transform(model, G)
    fused = [n.kwargs.get("epilogue") for n in gm.graph.nodes if n.target is ops.ghost_norm]
    assert fused == [None, "add_relu", None]
    record = fxghost.report(gm).layers[0]
    assert (record.calls, record.epilogue) == (3, "none, add+relu")
    run_side_by_side(model, G, [(12, 3, 2, 2), (10, 3, 2, 2)], [(3, 3, 2, 2)], transformed=gm)


def test_a_relu_with_hooks_at_transform_time_stays_a_module_call() -> None:
    model = BnRelu("module").double()
    calls: list[int] = []
    model.relu.register_forward_hook(lambda m, i, o: calls.append(1))
    gm = fxghost.transform(model, G)
    assert epilogues(gm) == {"bn": None}
    assert any(n.op == "call_module" and n.target == "relu" for n in gm.graph.nodes)
    gm(torch.randn(8, 3, 5, 5, dtype=torch.float64))
    assert calls == [1]


def test_fuse_epilogues_false_keeps_the_graph() -> None:
    model = res_net()
    gm = fxghost.transform(model, G, fuse_epilogues=False)
    assert set(epilogues(gm).values()) == {None}
    assert len(relus_and_adds(gm)) == 6
    assert "epilogue" not in fxghost.report(gm).rows()[0]
    traced = torch.fx.symbolic_trace(model)
    again = fxghost.ghost_batchnorm_pass(traced, G, fuse_epilogues=False)
    assert set(epilogues(again).values()) == {None}
    with pytest.raises(TypeError, match="fuse_epilogues"):
        fxghost.transform(model, G, fuse_epilogues=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fuse_epilogues"):
        fxghost.ghost_batchnorm_pass(traced, G, fuse_epilogues="no")  # type: ignore[arg-type]


def test_hook_registered_after_transform_fires_and_results_match(backend: str) -> None:
    """A fused ReLU module that has hooks when it runs is called, unfused: its forward hooks and
    pre-hooks see its input and output, and a hook's returned output counts."""
    torch.manual_seed(0)
    model = res_net().double()
    gm = fxghost.transform(model, G, backend=backend)
    assert epilogues(gm)["1.bn2"] == "add_relu"
    seen: list[tuple[torch.Size, bool]] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        seen.append((out.shape, bool((out >= 0).all())))
        return out * 0.5

    handle = model[1].relu.register_forward_hook(hook)
    pre = model[1].relu.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape, False)))
    # The reference is a copy of the model made now: its ReLU has the same hooks.
    run_side_by_side(model, G, TRAIN, EVAL, transformed=gm)
    # Block 1 calls its ReLU twice (after bn1, after the add); both times, in each of the 3
    # steps of both models.
    assert len(seen) == 2 * 2 * 2 * 3
    handle.remove()
    pre.remove()
    seen.clear()
    gm(torch.randn(8, 3, 5, 5, dtype=torch.float64))
    assert seen == []


def test_hooks_on_fused_identities_registered_after_transform_fire(backend: str) -> None:
    """Forward pre-hooks and hooks registered after ``transform`` on the ``nn.Identity`` modules
    of fused epilogues fire, in the unfused graph's order, on its values (the BatchNorm's output
    before the ReLU, the sum before it); a hook's returned output counts; and the results are
    the unfused graph's, bit for bit. Removed, the epilogues run fused again."""
    torch.manual_seed(0)
    model = IdentityBlock("iadd").double()
    twin = copy.deepcopy(model)
    fused = fxghost.transform(model, G, backend=backend)
    unfused = fxghost.transform(twin, G, backend=backend, fuse_epilogues=False)
    assert epilogues(fused)["bn2"] == "add_relu"
    seen: dict[int, list[tuple[str, torch.Tensor]]] = {id(model): [], id(twin): []}

    def pre_hook(log: list[tuple[str, torch.Tensor]], name: str) -> Callable[..., None]:
        # A copy: the in-place ReLU then writes into what the Identity passed on.
        return lambda m, args: log.append((name, args[0].clone()))

    def hook(log: list[tuple[str, torch.Tensor]], name: str) -> Callable[..., torch.Tensor]:
        def halve(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            log.append((name, out.clone()))
            return out * 0.5

        return halve

    handles = []
    for owner in (model, twin):
        log = seen[id(owner)]
        handles += [
            owner.drop_block.register_forward_pre_hook(pre_hook(log, "drop_block")),
            owner.drop_block.register_forward_hook(hook(log, "drop_block_out")),
            owner.drop_path.register_forward_hook(hook(log, "drop_path")),
            owner.post.register_forward_hook(hook(log, "post")),
        ]
    assert_same_as_unfused(model, fused, twin, unfused, BITWISE_STEPS)
    assert len(seen[id(model)]) == 4 * len(BITWISE_STEPS)
    for (name, a), (other, b) in zip(seen[id(model)], seen[id(twin)], strict=True):
        assert name == other and torch.equal(a, b), name
    first_step = seen[id(model)][:4]
    assert [name for name, _ in first_step] == ["drop_block", "drop_block_out", "drop_path", "post"]
    assert all(bool((t < 0).any()) for _, t in first_step)  # before the ReLU
    for handle in handles:
        handle.remove()
    seen[id(model)].clear()
    assert_same_as_unfused(model, fused, twin, unfused, BITWISE_STEPS[:1])
    assert seen[id(model)] == []


def test_an_identity_with_hooks_at_transform_time_keeps_the_graph() -> None:
    model = BnIdentityRelu(1, module_relu=True).double()
    calls: list[int] = []
    model.drops[0].register_forward_hook(lambda m, i, o: calls.append(1))
    gm = fxghost.transform(model, G)
    assert epilogues(gm) == {"bn": None}
    assert module_calls(gm) == ["conv", "drops.0", "relu", "head"]
    run_side_by_side(model, G, TRAIN[:1], EVAL, transformed=gm)
    assert len(calls) == 2 * 2  # both models, each step


def test_eval_and_dual_graph_module_fuse_both_graphs() -> None:
    class ModeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block("iadd", downsample=True, channels=3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block(x)
            if self.training:
                y = y * 2.0
            return torch.relu(self.bn(y))

    torch.manual_seed(0)
    model = ModeBranch().double()
    gm = fxghost.transform(model, G)
    assert isinstance(gm, DualGraphModule)
    expected = {"block.bn1": "relu", "block.bn2": "add_relu", "bn": "relu"}
    for graph in mode_graphs(gm):
        assert graph is not None
        found = {
            str(n.args[3]): n.kwargs.get("epilogue")
            for n in graph.nodes
            if n.target is ops.ghost_norm
        }
        assert {k: v for k, v in found.items() if k in expected} == expected
    run_side_by_side(model, G, TRAIN, [*EVAL, (17, 3, 5, 5)], transformed=gm)


@pytest.mark.parametrize(
    "make", [res_net, lambda: IdentityBlock("iadd")], ids=["plain", "identity"]
)
def test_rerunning_the_pass_keeps_fused_nodes_and_applies_a_new_ghost_size(
    make: Callable[[], nn.Module],
) -> None:
    torch.manual_seed(0)
    model = make().double()
    gm = fxghost.transform(model, G, backend="torch")
    again = fxghost.ghost_batchnorm_pass(gm, 3, root=model)
    for name, norm in norm_nodes(again).items():
        old = norm_nodes(gm)[name]
        assert norm.args[2] == 3
        assert set(norm.kwargs) == set(old.kwargs) - {"backend"}, name  # "auto" now
        assert steps_of(norm) == steps_of(old), name
    assert {n.name for n in again.graph.nodes} == {n.name for n in gm.graph.nodes}
    assert fxghost.report(again).layers[1].epilogue == "add+relu"
    run_side_by_side(model, 3, [(12, 3, 5, 5), (10, 3, 5, 5)], EVAL, transformed=again)


def test_ghost_norm_checks_its_epilogue() -> None:
    bn = nn.BatchNorm1d(3)
    groups = ops.ghost_view(torch.randn(8, 3), bn, 4, "bn")
    with pytest.raises(ValueError, match="layer 'bn'.*epilogue='gelu'"):
        ops.ghost_norm(groups, bn, 4, "bn", epilogue="gelu")
    with pytest.raises(ValueError, match="layer 'bn'.*residual"):
        ops.ghost_norm(groups, bn, 4, "bn", epilogue="add_relu")
    with pytest.raises(ValueError, match="layer 'bn'.*residual"):
        ops.ghost_norm(groups, bn, 4, "bn", epilogue="relu", residual=torch.randn(8, 3))
    with pytest.raises(ValueError, match="layer 'bn'"):
        ops.ghost_norm(groups, bn, 4, "bn", residual=torch.randn(8, 3))
    identity, relu, r = nn.Identity(), nn.ReLU(), torch.randn(8, 3)
    with pytest.raises(ValueError, match="layer 'bn'.*epilogue="):
        ops.ghost_norm(groups, bn, 4, "bn", epilogue_steps=(relu,))
    wrong: list[tuple[str, tuple[Any, ...]]] = [
        ("relu", (relu, identity)),  # the ReLU not last
        ("relu", (identity,)),  # no ReLU
        ("relu", ()),
        ("relu", ("add", relu)),  # an add without the epilogue
        ("add_relu", (identity, relu)),  # the add missing
        ("add_relu", ("add", "add", "relu")),
        ("relu", (nn.Dropout(), relu)),  # not a pass-through
        ("relu", (SubIdentity(), relu)),
        ("relu", (nn.LeakyReLU(),)),
        ("relu", ("gelu",)),
    ]
    for epilogue, steps in wrong:
        residual = r if epilogue == "add_relu" else None
        with pytest.raises(ValueError, match="layer 'bn'.*epilogue_steps=.*nn.Identity"):
            ops.ghost_norm(
                groups, bn, 4, "bn", epilogue=epilogue, residual=residual, epilogue_steps=steps
            )
    with pytest.raises(ValueError, match="layer 'bn'.*pass epilogue_steps= alone"):
        ops.ghost_norm(
            groups, bn, 4, "bn", epilogue="relu", epilogue_steps=(relu,), activation_module=relu
        )
    with pytest.raises(ValueError, match="layer 'bn'.*nn.ReLU.*not a GELU"):
        ops.ghost_norm(groups, bn, 4, "bn", epilogue="relu", activation_module=nn.GELU())


def test_ghost_norm_runs_hooked_epilogue_steps_in_order() -> None:
    """While a module of ``epilogue_steps`` has hooks, each step runs as the unfused graph ran
    it, on the values it saw; ``activation_module=``, the older spelling, still works."""
    torch.manual_seed(0)
    x, residual = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    before, after, relu = nn.Identity(), nn.Identity(), nn.ReLU()
    calls: list[tuple[str, torch.Tensor]] = []
    for name, module in (("before", before), ("after", after), ("relu", relu)):
        module.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, a[0].clone())))
    bn, twin = nn.BatchNorm1d(3).double(), nn.BatchNorm1d(3).double()
    y, tail = ops.ghost_norm(
        ops.ghost_view(x, bn, 4, "bn"),
        bn,
        4,
        "bn",
        epilogue="add_relu",
        residual=residual,
        epilogue_steps=(before, "add", after, relu),
    )
    normalized = ops.ghost_unview(
        ops.ghost_norm(ops.ghost_view(x, twin, 4, "bn"), twin, 4, "bn"), "bn"
    )
    assert tail is None and torch.equal(y, torch.relu(normalized + residual))
    assert [name for name, _ in calls] == ["before", "after", "relu"]
    assert torch.equal(calls[0][1], normalized)
    assert torch.equal(calls[1][1], normalized + residual)
    calls.clear()
    old, _ = ops.ghost_norm(
        ops.ghost_view(x, bn, 4, "bn"), bn, 4, "bn", epilogue="relu", activation_module=relu
    )
    new, _ = ops.ghost_norm(
        ops.ghost_view(x, twin, 4, "bn"), twin, 4, "bn", epilogue="relu", epilogue_steps=(relu,)
    )
    assert torch.equal(old, new) and [name for name, _ in calls] == ["relu", "relu"]


@pytest.mark.parametrize(
    ("residual", "inplace"),
    [
        (torch.randn(1, 3), False),  # broadcast
        (torch.randn(8, 3, dtype=torch.float64), False),  # promoted
        (torch.randn(8, 3, dtype=torch.float64), True),  # in place: y's dtype
        (torch.randn(8, 3).t().contiguous().t(), False),  # another layout: grouped
        (2.0, False),  # a number
    ],
)
def test_residuals_the_backend_cannot_take_are_added_as_the_unfused_graph_does(
    residual: Any, inplace: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    bn, twin = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    fused = ops.ghost_unview(
        ops.ghost_norm(
            ops.ghost_view(x, bn, 3, "bn"),
            bn,
            3,
            "bn",
            epilogue="add_relu",
            residual=residual,
            add_inplace=inplace,
        ),
        "bn",
    )
    y = ops.ghost_unview(ops.ghost_norm(ops.ghost_view(x, twin, 3, "bn"), twin, 3, "bn"), "bn")
    expected = torch.relu(y.add_(residual) if inplace else y + residual)
    assert fused.dtype == expected.dtype
    assert torch.equal(fused, expected)
    assert torch.equal(bn.running_var, twin.running_var)


def test_process_group_and_eval_apply_the_epilogue_after_the_norm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bn = nn.BatchNorm1d(3)
    x, residual = torch.randn(8, 3), torch.randn(8, 3)
    normalized = torch.randn(8, 3)
    monkeypatch.setattr(fxghost._distributed, "ghost_norm", lambda *args: normalized.clone())
    groups = (x.unsqueeze(0), None)
    y, tail = ops.ghost_norm(
        groups, bn, 4, "bn", process_group=7, epilogue="add_relu", residual=residual
    )
    assert tail is None and torch.equal(y, torch.relu(normalized + residual))
    bn.eval()
    y, _ = ops.ghost_norm(groups, bn, 4, "bn", epilogue="relu")
    assert torch.equal(y, torch.relu(bn(x)))


def test_apply_epilogue_keeps_autograd_right() -> None:
    """In eager mode the epilogue is applied in place on the backend's fresh output."""
    y = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    out = _common.apply_epilogue(y * 1.0, _common.Epilogue(r, True))
    expected = torch.relu(y + r.flatten(0, 1))
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(y.grad, (expected > 0).double())
    assert torch.equal(r.grad.flatten(0, 1), (expected > 0).double())


# torch.compile: aot_eager across a tail and eval; one inductor compile (tens of seconds here).
@pytest.fixture(scope="module")
def fresh_dynamo() -> Iterator[None]:
    """One dynamo cache for the compiled tests, emptied before and after them."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_matches_reference(
    compile_backend: str, train: list[tuple[int, ...]], evals: list[tuple[int, ...]]
) -> None:
    torch.manual_seed(0)
    model = res_net().double()
    gm = fxghost.transform(model, G)
    assert sum(e is not None for e in epilogues(gm).values()) == 4
    compiled = torch.compile(gm, backend=compile_backend, fullgraph=True)
    run_side_by_side(model, G, train, evals, transformed=compiled)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_aot_eager_matches_reference() -> None:
    _compiled_matches_reference("aot_eager", TRAIN, EVAL)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_inductor_matches_reference() -> None:
    _compiled_matches_reference("inductor", [TRAIN[1]], [])
