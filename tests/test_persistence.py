"""Saving and loading: a pickled GraphModule in a fresh process, state dicts both ways with the
original model, and a model trained through fxghost deployed as the plain model."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from conftest import ConstantNet, assert_close, init_bns
from torch import nn

import fxghost
from fxghost._graph_module import DualGraphModule
from fxghost.reference import apply_chunked_ghost_batchnorm

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
G = 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """BatchNorm2d called twice (shared), a BatchNorm that is never called (still in the
    state_dict), BatchNorm1d with cumulative averaging, and a non-persistent buffer (not in it)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn_unused = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 5 * 5, 6)
        self.bn1d = nn.BatchNorm1d(6, momentum=None)
        self.register_buffer("scale", torch.tensor(1.5), persistent=False)
        init_bns(self).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = self.bn(x) * self.scale
        return self.bn1d(self.head(x.flatten(1)))


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).double()


MODELS = {
    # name: (builder, one sample's shape)
    "net": (Net, (3, 5, 5)),
    "resnet18": (_resnet18, (3, 32, 32)),
}

# Runs in a fresh interpreter: for each saved job, load the pickled GraphModule, then one
# training step and one eval step.
_LOADER = textwrap.dedent(
    """
    import sys, torch, fxghost
    torch.set_num_threads(int(sys.argv[2]))  # the parent's: same reduction order, same bits
    for job in sys.argv[3:]:
        gm = torch.load(f"{sys.argv[1]}/{job}.gm.pt", weights_only=False)
        data = torch.load(f"{sys.argv[1]}/{job}.data.pt")
        result = {
            "type": type(gm).__name__,
            "is_graph_module": isinstance(gm, torch.fx.GraphModule),
            "ghost_norm_layers": [
                n.meta.get("fxghost", {}).get("source_layer")
                for n in gm.graph.nodes
                if n.op == "call_function" and n.target is fxghost.ops.ghost_norm
            ],
            "state_keys": list(gm.state_dict()),
            "rewritten": fxghost.report(gm).rewritten_names,
        }
        gm.train()
        x = data["train"].clone().requires_grad_(True)
        y = gm(x)
        y.backward(data["dy"])
        result["train_out"] = y.detach()
        result["input_grad"] = x.grad
        result["grads"] = {k: p.grad for k, p in gm.named_parameters()}
        result["state"] = {k: v.clone() for k, v in gm.state_dict().items()}
        gm.eval()
        with torch.no_grad():
            result["eval_out"] = gm(data["eval"])
        torch.save(result, f"{sys.argv[1]}/{job}.out.pt")
    """
)


@dataclass
class Saved:
    """A transformed model saved with torch.save, its data, and what the fresh process got."""

    model: nn.Module
    gm: torch.fx.GraphModule
    data: dict[str, torch.Tensor]
    got: dict[str, Any]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Saved]:
    """Save every model of MODELS, then load them all in one fresh process (starting one costs
    seconds: importing torch and torchvision)."""
    tmp = tmp_path_factory.mktemp("persist")
    jobs: dict[str, tuple[nn.Module, torch.fx.GraphModule, dict[str, torch.Tensor]]] = {}
    for name, (build, sample) in MODELS.items():
        model = build()
        gm = fxghost.transform(model, G)
        torch.save(gm, tmp / f"{name}.gm.pt")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((10, *sample), generator=gen, dtype=torch.float64)  # ghost batches 4, 4, 2
        with torch.no_grad():
            y_shape = gm.eval()(x[:1]).shape[1:]  # eval: no running statistics updated
        data = {
            "train": x,
            "dy": torch.randn((10, *y_shape), generator=gen, dtype=torch.float64),
            "eval": x[:3],  # smaller than the ghost size
        }
        torch.save(data, tmp / f"{name}.data.pt")
        jobs[name] = (model, gm, data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(tmp), str(torch.get_num_threads()), *jobs],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return {
        name: Saved(model, gm, data, torch.load(tmp / f"{name}.out.pt", weights_only=False))
        for name, (model, gm, data) in jobs.items()
    }


def _ghost_norm_nodes(gm: torch.fx.GraphModule) -> list[str]:
    """The source layer of each ghost_norm node, in graph order (node names are not kept:
    re-tracing names a shared layer's second call ``bn_1_ghost_norm``, not ``bn_ghost_norm_1``)."""
    return [
        n.meta["fxghost"]["source_layer"]
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is fxghost.ops.ghost_norm
    ]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pickled_graph_module_in_fresh_process(name: str, saved: dict[str, Saved]) -> None:
    model, gm, data, got = saved[name].model, saved[name].gm, saved[name].data, saved[name].got
    nodes = _ghost_norm_nodes(gm)
    assert nodes, "nothing was rewritten"

    # The same steps here, from the same saved state.
    gm.train()
    xg = data["train"].clone().requires_grad_(True)
    y = gm(xg)
    y.backward(data["dy"])
    grads = {k: p.grad for k, p in gm.named_parameters()}
    state = gm.state_dict()
    gm.eval()
    with torch.no_grad():
        y_eval = gm(data["eval"])

    # Unpickling re-traces the generated code: the ghost ops must come back as graph nodes, with
    # their provenance, not be traced through.
    assert got["is_graph_module"], got["type"]
    assert got["ghost_norm_layers"] == nodes
    assert got["rewritten"] == fxghost.report(gm).rewritten_names
    # The model's state_dict keys, in its order: the unused layer in, the non-persistent out.
    assert got["state_keys"] == list(model.state_dict())
    # Same code, same data, same thread count: bit-identical.
    assert torch.equal(got["train_out"], y.detach())
    assert torch.equal(got["input_grad"], xg.grad)
    assert got["grads"].keys() == grads.keys()
    for k, g in grads.items():
        if g is None:  # bn_unused: no gradient on either side
            assert got["grads"][k] is None, k
        else:
            assert torch.equal(got["grads"][k], g), f"grad of {k}"
    assert got["state"].keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got["state"][k], v), f"state {k}"
    assert torch.equal(got["eval_out"], y_eval)


def test_state_dict_round_trips_with_the_original_model() -> None:
    model = Net(seed=0)
    gm = fxghost.transform(model, G)
    # Same keys in the same order: the unused BatchNorm is in both, the non-persistent buffer in
    # neither.
    assert list(gm.state_dict()) == list(model.state_dict())
    assert "bn_unused.running_mean" in gm.state_dict() and "scale" not in gm.state_dict()

    # GraphModule -> plain model.
    plain = Net(seed=1)
    plain.load_state_dict(gm.state_dict(), strict=True)
    for k, v in gm.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k

    # Plain model -> GraphModule: loading into the GraphModule writes into the tensors it shares
    # with the model it was built from.
    other_model = Net(seed=2)
    other = fxghost.transform(other_model, G)
    other.load_state_dict(model.state_dict(), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[k], v), k
    shared = dict(other_model.named_parameters())
    for k, p in other.named_parameters():
        assert p is shared[k], k

    # Equal state, equal behaviour: a training step (outputs and updated statistics), then eval.
    x = torch.randn(10, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(gm.train()(x), other.train()(x))
    for k, v in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[k], v), f"{k} after a training step"
    gm.eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(gm(x[:2]), plain.eval()(x[:2]))


def test_trained_model_deploys_as_the_plain_model(tmp_path: Path) -> None:
    """Train through fxghost, save the state dict, load it into a fresh plain model: its eval
    outputs are the trained GraphModule's (and it matches the chunked reference's training)."""
    model = Net(seed=0)
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), G)
    gm = fxghost.transform(model, G)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (gm, reference)]
    gen = torch.Generator().manual_seed(0)
    for step, n in enumerate((12, 10, 9)):  # 4+4+4, 4+4+2, 3+3+3
        x = torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64)
        for m, opt in zip((gm, reference), opts, strict=True):
            m.train()
            m(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        for (k, a), (_, b) in zip(
            model.state_dict().items(), reference.state_dict().items(), strict=True
        ):
            if a.is_floating_point():
                assert_close(a, b, f"step {step}: {k}")
            else:
                assert torch.equal(a, b), f"step {step}: {k}"

    torch.save(gm.state_dict(), tmp_path / "trained.pt")
    deployed = Net(seed=3)
    deployed.load_state_dict(torch.load(tmp_path / "trained.pt", weights_only=True), strict=True)
    deployed.eval()
    gm.eval()
    x = torch.randn(3, 3, 5, 5, generator=gen, dtype=torch.float64)  # fewer samples than g
    with torch.no_grad():
        y_gm, y_plain = gm(x), deployed(x)
    # Eval with running statistics is plain BatchNorm eval on both sides.
    assert torch.equal(y_gm, y_plain)
    assert_close(y_gm, reference.eval()(x), "eval vs the chunked reference")


def test_state_dict_keys_with_tensor_constants_in_forward() -> None:
    """Tensors that tracing lifts out of forward (``_tensor_constantN``) belong to the graph:
    not in state_dict, so strict loading works both ways."""
    model = ConstantNet().double()
    gm = fxghost.transform(model, G)
    assert list(gm.state_dict()) == list(model.state_dict())
    model.load_state_dict(gm.state_dict(), strict=True)
    gm.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(6, 3, dtype=torch.float64)
    assert torch.equal(gm.eval()(x), model.eval()(x))


def test_pickled_tensor_constants_still_work() -> None:
    """The lifted constants are pickled with the GraphModule and used after loading."""
    model = ConstantNet().double()
    loaded = _pickle_round_trip(fxghost.transform(model, G))
    x = torch.randn(6, 3, dtype=torch.float64)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_tensor_constants_alone_do_not_make_a_dual_graph_module() -> None:
    """The train and eval traces lift the constant under different names (_tensor_constant0
    and 1); with equal values the programs are the same, so one graph serves both modes."""
    gm = fxghost.transform(ConstantNet().double(), G)
    assert not isinstance(gm, DualGraphModule)
    assert [n for n, _ in gm.named_buffers() if "constant" in n] == ["_tensor_constant0"]


class TrainOnlyConstant(nn.Module):
    """A constant whose value depends on the mode: the traces differ only in that value."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + torch.full((3,), 1.0 if self.training else 2.0)


def test_mode_dependent_constants_keep_a_graph_per_mode() -> None:
    model = TrainOnlyConstant().double()
    gm = fxghost.transform(model, G)
    assert isinstance(gm, DualGraphModule)
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(gm.eval()(x), model.eval()(x))


def test_tensor_constants_stay_out_of_state_dict_after_pickling() -> None:
    model = ConstantNet().double()
    buf = io.BytesIO()
    torch.save(fxghost.transform(model, G), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert list(loaded.state_dict()) == list(model.state_dict())
    loaded.load_state_dict(model.state_dict(), strict=True)


class Branchy(nn.Module):
    """Dropout only in training, by a Python branch: traced in both modes, a DualGraphModule.
    Also an unused BatchNorm and a non-persistent buffer, as in :class:`Net`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn = nn.BatchNorm1d(3)
        self.bn_unused = nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        if self.training:
            x = torch.nn.functional.dropout(x, 0.5)
        return self.head(x) * self.scale


def _pickle_round_trip(gm: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)  # type: ignore[no-any-return]


def test_pickled_dual_graph_module_computes_the_same() -> None:
    """Both modes' graphs survive pickling: the same outputs in training (same dropout seed)
    and eval."""
    model = Branchy()
    gm = fxghost.transform(model, G)
    loaded = _pickle_round_trip(gm)
    x = torch.randn(8, 3, dtype=torch.float64)
    for training in (True, False):
        gm.train(training)
        loaded.train(training)
        torch.manual_seed(1)
        y = gm(x)
        torch.manual_seed(1)
        assert torch.equal(loaded(x), y), f"training={training}"


def test_pickled_dual_graph_module_keeps_state_dict_and_report() -> None:
    model = Branchy()
    gm = fxghost.transform(model, G)
    assert list(gm.state_dict()) == list(model.state_dict())  # before pickling: fine
    loaded = _pickle_round_trip(gm)
    assert type(loaded).__name__ == type(gm).__name__
    assert fxghost.report(loaded).rewritten_names == fxghost.report(gm).rewritten_names
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    loaded.load_state_dict(model.state_dict(), strict=True)
    # Still one graph per mode after loading (re-tracing renames nodes), in the saved mode.
    assert loaded.training == gm.training
    assert "dropout" not in loaded.eval().code
    assert "dropout" in loaded.train().code


def test_parameter_and_state_dict_order_match_the_model() -> None:
    """An optimizer's state_dict maps parameters by position: one saved from an optimizer over
    ``gm.parameters()`` must resume an optimizer over ``model.parameters()``."""
    model = Net(seed=0)  # bn_unused is defined before head but never called
    gm = fxghost.transform(model, G)
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in gm.named_buffers()] == [n for n, _ in model.named_buffers()]
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    gm.train()(torch.randn(8, 3, 5, 5, dtype=torch.float64)).sum().backward()
    opt.step()
    resumed = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(opt.state_dict())
    for p in model.parameters():  # the same tensors: each must get its own momentum back
        if p in opt.state:
            assert torch.equal(resumed.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
        else:
            assert p not in resumed.state


def test_report_survives_pickling() -> None:
    gm = fxghost.transform(Net(), G)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert _ghost_norm_nodes(loaded) == _ghost_norm_nodes(gm)
    assert fxghost.report(loaded).rewritten_names == fxghost.report(gm).rewritten_names
