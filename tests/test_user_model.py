"""What fxghost hands back is still the user's model: module types and objects, container
indexing, hooks on any module, one train/eval switch, for both ``transform`` and the in-place
API, on torchvision and timm models and in a Lightning fit."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import assert_state_scaled, init_bn
from torch import nn

import fxghost
from fxghost._graph_module import SOURCE_ATTR
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

G = 4
REL = 1e-9


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _initialized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for bn in _bns(model):
        init_bn(bn, torch.float64)
    return model.double()


def _quiet_transform(model: nn.Module, g: int = G, **kwargs: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxghost.PartialRewriteWarning)
        return fxghost.transform(model, g, **kwargs)  # type: ignore[arg-type]


def _step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.pow(2).mean().backward()
    return out


# In place: every module path keeps its object and its type.


def _timm_model() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5)


@pytest.mark.parametrize("build", ["resnet18", "timm_mobilenetv3"])
def test_in_place_keeps_every_module_object_type_and_container(build: str) -> None:
    model = torchvision.models.resnet18(num_classes=5) if build == "resnet18" else _timm_model()
    model = _initialized(model)
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), G)
    modules = dict(model.named_modules())
    types = {name: type(m) for name, m in modules.items()}
    layers = [n for n, m in modules.items() if fxghost._select.rule_for(m) is not None]

    fxghost.apply_ghost_batchnorm(model, G)
    assert dict(model.named_modules()) == modules
    assert {name: type(m) for name, m in model.named_modules()} == types
    assert fxghost.report(model).rewritten_names == layers and layers
    if build == "resnet18":
        block = model.layer1[0]  # type: ignore[index]
        assert block is modules["layer1.0"] and len(model.layer1) == 2  # type: ignore[arg-type]
        assert isinstance(model.bn1, nn.BatchNorm2d) and list(model.layer2) == [
            modules["layer2.0"],
            modules["layer2.1"],
        ]
    else:
        assert model.blocks[0][0] is modules["blocks.0.0"]  # type: ignore[index]

    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    _step(model, x)
    _step(reference, x)
    assert_state_scaled(model, reference, f"{build} in place, one step", REL)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-9, msg=name)
    fxghost.revert_ghost_batchnorm(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


# Hooks on any module.


class _Recorder:
    """Hooks that record what they were called with, and that fail on proxies."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def _record(self, what: str, value: object) -> None:
        if not isinstance(value, torch.Tensor) or isinstance(value, torch.fx.Proxy):
            raise AssertionError(f"{what} hook called with {type(value).__name__}")
        self.calls.append((what, tuple(value.shape)))

    def register(self, model: nn.Module) -> None:
        block, layer1 = model.layer1[0], model.layer1  # type: ignore[index]
        block.register_forward_hook(lambda m, i, o: self._record("block", o))
        layer1.register_forward_pre_hook(lambda m, i: self._record("layer1 pre", i[0]))
        model.layer2.register_forward_hook(
            lambda m, args, kwargs, o: self._record("layer2 kwargs", o), with_kwargs=True
        )
        model.layer3[1].register_full_backward_hook(  # type: ignore[index]
            lambda m, gi, go: self._record("layer3.1 backward", go[0])
        )
        model.fc.register_full_backward_hook(lambda m, gi, go: self._record("fc backward", gi[0]))
        model.register_forward_hook(lambda m, i, o: self._record("model", o))


EXPECTED_CALLS = [
    ("layer1 pre", (8, 64, 8, 8)),
    ("block", (8, 64, 8, 8)),
    ("layer2 kwargs", (8, 128, 4, 4)),
    ("model", (8, 5)),
    ("fc backward", (8, 512)),
    ("layer3.1 backward", (8, 256, 2, 2)),
]


@pytest.mark.parametrize("api", ["transform", "in_place"])
def test_hooks_on_blocks_containers_and_layers_fire_once_per_call(api: str) -> None:
    model = _initialized(torchvision.models.resnet18(num_classes=5))
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), G)
    recorder = _Recorder()
    recorder.register(model)
    if api == "transform":
        net = _quiet_transform(model)  # the hooks must not run here, on proxies
    else:
        net = fxghost.apply_ghost_batchnorm(model, G)
    assert recorder.calls == []
    assert fxghost.report(net).rewritten_names == [
        n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
    ]

    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    for step in range(2):
        recorder.calls.clear()
        out = _step(net, x)
        assert recorder.calls == EXPECTED_CALLS, step
    torch.testing.assert_close(out, _step(reference, x), rtol=1e-9, atol=1e-10)
    _step(reference, x)
    assert_state_scaled(model, reference, f"{api} with hooks, two steps", REL)


@pytest.mark.parametrize("api", ["transform", "in_place"])
def test_backward_hooks_on_a_batchnorm_fire_with_its_gradients(api: str) -> None:
    """(Not on a ResNet's: PyTorch refuses full backward hooks on a module whose output an
    in-place ReLU modifies, with or without fxghost.)"""
    model = _initialized(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()))
    expected = copy.deepcopy(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model[1].register_full_backward_pre_hook(lambda m, go: seen.append(("pre", go[0])) and None)
    model[1].register_full_backward_hook(lambda m, gi, go: seen.append((gi[0], go[0])) and None)
    net = _quiet_transform(model) if api == "transform" else fxghost.apply_ghost_batchnorm(model, G)
    assert fxghost.report(net).rewritten_names == ["1"]
    assert not any(r.warn for r in fxghost.report(net).layers)

    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    _step(net, x)
    assert [type(a).__name__ for a, _ in seen] == ["str", "Tensor"]  # once per backward
    # What the hooks see is autograd's gradient at the layer's input and output.
    mid = expected[0](x)
    mid.retain_grad()
    ghosted = apply_chunked_ghost_batchnorm(expected, G)[1](mid)
    out = expected[2](ghosted)
    ghosted.retain_grad()
    out.pow(2).mean().backward()
    torch.testing.assert_close(seen[1][0], mid.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(seen[1][1], ghosted.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(seen[0][1], ghosted.grad, rtol=1e-9, atol=1e-12)


def test_hook_replacing_the_output_of_a_block_takes_effect_in_the_graph() -> None:
    model = _initialized(
        nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()))
    )
    model[1].register_forward_hook(lambda m, i, o: o * 0 + 7)
    gm = _quiet_transform(model)
    assert torch.equal(
        gm(torch.randn(8, 3, dtype=torch.float64)), torch.full((8, 4), 7.0, dtype=torch.float64)
    )
    assert fxghost.report(gm).rewritten_names == ["1.0"]


# One train/eval switch.


class _DropoutNet(nn.Module):
    """A forward that reads self.training (traced in both modes), and a block that does not
    trace and reads it too (kept as Python)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.block = _Untraceable()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.dropout(self.stem(x), 0.5, training=self.training)
        return self.head(self.block(y))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.detach().sum()) > 1e30:  # data-dependent: not traceable
            x = x * 0
        return F.dropout(self.bn(x), 0.5, training=self.training)


def test_one_train_eval_switch_for_model_and_result() -> None:
    model = _initialized(_DropoutNet())
    gm = _quiet_transform(model)
    assert fxghost.report(gm).rewritten_names == ["stem.1", "block.bn"]
    x = torch.randn(16, 6, dtype=torch.float64)

    model.eval()  # the README's deploy step, on the model
    assert not gm.training and not gm.block.training
    plain = model(x)
    torch.testing.assert_close(gm(x), plain, rtol=0, atol=0)  # no dropout, plain eval
    torch.testing.assert_close(gm(x), plain, rtol=0, atol=0)

    gm.train()
    assert model.training and all(m.training for m in model.modules())
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(2)
    assert not torch.equal(a, gm(x))  # dropout again

    gm.eval()  # the other way round (training above moved the running statistics)
    assert not model.training and not any(m.training for m in model.modules())
    plain = model(x)
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
    torch.testing.assert_close(gm(x), plain, rtol=0, atol=0)

    # Copies keep the one switch with their own copies of the model.
    for duplicate in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        source = getattr(duplicate, SOURCE_ATTR)
        source.train()
        assert duplicate.training and duplicate.block.training
        duplicate.eval()
        assert not source.training and not source.block.training
        assert model.training is False


def test_one_switch_under_torch_compile() -> None:
    model = _initialized(_DropoutNet())
    model.block = nn.Sequential(nn.BatchNorm1d(8).double())  # traces: one compiled graph
    gm = _quiet_transform(model)
    compiled = torch.compile(gm, backend="aot_eager")
    x = torch.randn(16, 6, dtype=torch.float64)
    compiled(x)
    model.eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    model.train()
    torch.manual_seed(3)
    a = compiled(x)
    torch.manual_seed(4)
    assert not torch.equal(a, compiled(x))


# A Lightning fit whose configure_optimizers indexes containers.


def test_lightning_configure_optimizers_indexes_containers() -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from fxghost.lightning import GhostBatchNorm

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Module()
            self.net.stem = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.net.head = nn.Linear(8, 2)
            self.steps = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.head(self.net.stem(x))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
            assert isinstance(self.net.stem[1], nn.BatchNorm1d)
            self.steps += 1
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(
                [
                    {"params": self.net.stem[0].parameters(), "lr": 0.01},
                    {"params": [*self.net.stem[1].parameters(), *self.net.head.parameters()]},
                ],
                lr=0.1,
            )

    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    module = Module()
    bn = module.net.stem[1]
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[GhostBatchNorm(ghost_batch_size=G)],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    assert module.steps == 2 and module.net.stem[1] is bn
    assert int(bn.num_batches_tracked) == 2 * 16 // G  # ghosted: four ghost batches per step


# The README's first example, and the same example in docs/index.md, run as written, and validate
# and deploy the objects they say.


def _usage_block(page: str) -> str:
    text = (Path(__file__).resolve().parents[1] / page).read_text()
    section = text[text.index("## Usage") :]
    return section[section.index("```python\n") + 10 : section.index("```\n", 10)]


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_usage_example_trains_validates_and_deploys(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Small(nn.Module):  # a stand-in for resnet18 that reads self.training, like many do
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.features(x).mean((2, 3))
            return self.fc(F.dropout(y, 0.5, training=self.training))

    built: list[nn.Module] = []
    monkeypatch.setattr(torchvision.models, "resnet18", lambda: built.append(Small()) or built[0])
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: real_compile(m, backend="aot_eager"))
    monkeypatch.chdir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 10, (64,))) for _ in "ab"]
    validated: list[bool] = []

    def validate(step: nn.Module, val_loader: list[torch.Tensor]) -> None:
        model = built[0]
        assert not model.training and not model.features[1].training
        with torch.no_grad():
            for x in val_loader:  # a batch below the ghost size: plain eval
                torch.testing.assert_close(step(x), model(x), rtol=0, atol=0)
        validated.append(True)

    scope = {"loader": loader, "val_loader": [torch.randn(3, 3, 8, 8)], "epochs": 2}
    scope["validate"] = validate
    exec(compile(_usage_block(page), f"{page} (Usage)", "exec"), scope)
    model = built[0]
    assert validated == [True, True]
    assert int(model.features[1].num_batches_tracked) == 2 * 2 * 64 // 32  # ghosted training
    saved = torch.load(tmp_path / "resnet18.pt")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
