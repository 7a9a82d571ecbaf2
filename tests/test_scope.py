"""What is ghosted where, and what of the model is kept: tracer leaves, untraceable code, bare
BatchNorms, checkpointing, hooks, state-dict metadata, copies, re-applying, the one warning."""

from __future__ import annotations

import copy
import functools
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import assert_same_state, run_side_by_side
from torch import nn
from torch.utils.checkpoint import checkpoint

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _transform_quietly(model: nn.Module, g: int, **kwargs: object) -> nn.Module:
    """``transform``, failing on any warning: every layer here is ghosted."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fxghost.transform(model, g, **kwargs)


class _Block(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _ShapeReader(nn.Module):
    """Reads a shape in Python, as HuggingFace's TF-style padding helpers do: does not trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = 1 if x.shape[-1] % 2 else 0
        return self.bn(self.conv(nn.functional.pad(x, (pad, pad, pad, pad))))


class _Leafy(nn.Module):
    """A leaf (by leaf_modules) whose BatchNorm sits inside Python the tracer never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Block()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.inner(x)) * 0.5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _ShapeReader()
        self.leafy = _Leafy()
        self.head = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.leafy(self.stem(x)))


def test_every_batchnorm_of_leaves_and_untraceable_parts_is_ghosted() -> None:
    """BatchNorms under a tracer leaf and under a module that does not trace: all ghosted, the
    model's keys kept, and a training step equal to the chunked reference."""
    model = _Net().double()
    gm = _transform_quietly(model, 4, leaf_modules=[_Leafy])
    rep = fxghost.report(gm)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert rep.rewritten_names == names and rep.skipped == []
    assert list(gm.state_dict()) == list(model.state_dict())
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert type(model.stem.bn) is nn.BatchNorm2d and type(model.leafy) is _Leafy  # untouched
    run_side_by_side(model, 4, [(12, 3, 6, 6), (10, 3, 5, 5)], [(3, 3, 6, 6)], transformed=gm)


def test_a_bare_batchnorm_is_ghosted_with_its_own_keys() -> None:
    bn = nn.BatchNorm1d(4).double()
    gm = _transform_quietly(bn, 4)
    assert isinstance(gm, torch.fx.GraphModule)
    assert list(gm.state_dict()) == list(bn.state_dict())
    assert [p for p in gm.parameters()] == [p for p in bn.parameters()]  # shared, not copied
    assert fxghost.report(gm).rewritten_names == ["BatchNorm1d"]
    assert gm.eps == bn.eps and gm.num_features == 4
    run_side_by_side(bn, 4, [(10, 4), (8, 4)], [(2, 4)], transformed=gm)
    # Changing the layer's momentum takes effect, as in a model traced whole.
    bn.momentum = 0.5
    run_side_by_side(bn, 4, [(8, 4)], transformed=gm)


def test_batchnorm_called_by_untraceable_code_keeps_its_attributes() -> None:
    model = _ShapeReader().double()
    gm = _transform_quietly(model, 4)
    assert isinstance(gm, _ShapeReader)  # kept as Python code (a copy sharing its mode)
    assert isinstance(gm.bn, torch.fx.GraphModule)
    assert gm.bn.weight is model.bn.weight and gm.bn.running_mean is model.bn.running_mean
    # copy.deepcopy and pickle keep the layer module's state and behaviour.
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert list(copied.state_dict()) == list(model.state_dict())
        assert fxghost.report(copied).rewritten_names == ["bn"]
        x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
        copied.eval()
        gm.eval()
        torch.testing.assert_close(copied(x), gm(x))
    gm.train()
    run_side_by_side(model, 4, [(8, 3, 5, 5)], transformed=gm)


class _Checkpointed(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.block = nn.Sequential(*[_Block() for _ in range(depth)])
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(checkpoint(self.block, x, use_reentrant=False))


def _saved_tensors(model: nn.Module, x: torch.Tensor) -> int:
    """Tensors autograd saves for backward outside checkpointed regions."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return count


def test_checkpoint_calls_stay_checkpoint_calls() -> None:
    model = _Checkpointed().double()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = _transform_quietly(model, 4)
    assert isinstance(gm, torch.fx.GraphModule)
    assert "fxghost_ops_checkpoint(block, x, use_reentrant = False)" in gm.code
    assert isinstance(gm.block, torch.fx.GraphModule) and gm.block is not model.block
    assert fxghost.report(gm).rewritten_names == [f"block.{i}.bn" for i in range(3)]
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    # As few tensors saved as the plain model under the same checkpointing, not every
    # activation of the block.
    plain = _saved_tensors(copy.deepcopy(model), x)
    assert _saved_tensors(copy.deepcopy(gm), x) == plain
    # Recomputation runs the BatchNorms again, in the reference too: running statistics and
    # num_batches_tracked match it under the same checkpointing.
    for i in range(2):
        torch.manual_seed(i)
        x = torch.randn(8, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = gm(x), reference(x_ref)
        torch.testing.assert_close(y, y_ref)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert_same_state(model, reference, "after two checkpointed steps")
    assert int(model.block[0].bn.num_batches_tracked) == int(
        reference.block[0].bn.bn.num_batches_tracked
    )


class _Closure(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda t: self.block(t) * 2, x, use_reentrant=False)


class _Partial(nn.Module):
    """Checkpointing through a stored partial, as HuggingFace models do."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.block = _Block()
        self.checkpoint_fn = functools.partial(checkpoint, use_reentrant=reentrant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.checkpoint_fn(self.block.__call__, x)


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_Closure, "not a submodule"),
        (lambda: _Partial(False), "through a functools.partial"),
        (lambda: _Partial(True), "through a functools.partial"),
    ],
    ids=["lambda", "partial", "partial-reentrant"],
)
def test_other_checkpoints_keep_the_calling_module_as_python(
    make: Callable[[], nn.Module], why: str
) -> None:
    model = make().double()
    gm = _transform_quietly(model, 4)
    assert isinstance(gm, type(model)) and isinstance(gm.block, torch.fx.GraphModule)
    assert why in fxghost.report(gm).untraced[0].error
    x = torch.randn(8, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert _saved_tensors(copy.deepcopy(gm), x) == _saved_tensors(copy.deepcopy(model), x)
    run_side_by_side(model, 4, [(8, 4, 3, 3)], transformed=gm)


class _PySequential(nn.Sequential):
    """A Sequential whose forward does not trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] > 0  # a shape read in Python
        return super().forward(x)


def _hooked(calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]]) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU()).double()
    bn = model[1]

    def pre(module: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        calls.append(("pre", module, args[0].detach().clone(), None))
        return args[0] * 2  # a pre-hook may replace the input

    def post(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        calls.append(("post", module, args[0].detach().clone(), out.detach().clone()))
        return out + 1  # and a forward hook the output

    bn.register_forward_pre_hook(pre)
    bn.register_forward_hook(post)
    return model


@pytest.mark.parametrize("where", ["graph", "untraceable parent"])
def test_hooks_on_a_batchnorm_fire_with_the_same_arguments(where: str) -> None:
    """Forward hooks and pre-hooks run once per call with the layer, its whole input and its
    whole output, as ``nn.Module.__call__`` runs them, and what they return takes effect."""
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]] = []
    model = _hooked(calls)
    bn = model[1]
    if where == "graph":
        gm = _transform_quietly(model, 4)
        assert isinstance(gm, torch.fx.GraphModule)
    else:
        model.__class__ = _PySequential
        gm = _transform_quietly(model, 4)
        assert isinstance(gm, _PySequential) and isinstance(gm[1], torch.fx.GraphModule)
    x = torch.randn(8, 3, dtype=torch.float64)
    y = gm(x)
    assert [c[0] for c in calls] == ["pre", "post"]
    pre_call, post_call = calls
    assert pre_call[1] is bn and post_call[1] is bn
    torch.testing.assert_close(pre_call[2], model[0](x))
    torch.testing.assert_close(post_call[2], model[0](x) * 2)  # the pre-hook's replacement
    # The output the hook saw is the ghost-normalized input; the model's output is the hook's.
    ghost = apply_chunked_ghost_batchnorm(copy.deepcopy(nn.Sequential(nn.BatchNorm1d(4))), 4)
    ghost[0].bn.load_state_dict(bn.state_dict())
    ghost[0].bn.double()
    torch.testing.assert_close(post_call[3], ghost(model[0](x) * 2))
    torch.testing.assert_close(y, torch.relu(post_call[3] + 1))


def test_state_dict_metadata_survives() -> None:
    """torchvision's MNASNet is at state-dict version 2, and loads a version-1 checkpoint
    differently: the version must travel with the rewritten model's state_dict."""
    import torchvision

    model = torchvision.models.mnasnet0_5(weights=None)
    gm = _transform_quietly(model, 4)
    ours, theirs = gm.state_dict(), model.state_dict()
    assert ours._metadata == theirs._metadata  # type: ignore[attr-defined]
    fresh = torchvision.models.mnasnet0_5(weights=None)
    fresh.load_state_dict(ours)  # strict
    gm.load_state_dict(fresh.state_dict())
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert copied.state_dict()._metadata == theirs._metadata  # type: ignore[attr-defined]


def test_copies_keep_the_report() -> None:
    gm = _transform_quietly(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 4)
    for copied in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert fxghost.report(copied).rewritten_names == ["1"]


@pytest.mark.parametrize("again", ["transform", "pass"])
def test_transforming_again_applies_the_new_ghost_size(again: str) -> None:
    model = _Net().double()
    first = _transform_quietly(model, 4)
    second = (
        _transform_quietly(first, 2)
        if again == "transform"
        else fxghost.ghost_batchnorm_pass(first.leafy, 2, prefix="leafy")
    )
    rep = fxghost.report(second)
    assert {r.ghost_batch_size for r in rep.rewritten} == {2}
    assert all("changed from 4" in r.reason for r in rep.rewritten)
    if again == "transform":
        run_side_by_side(model, 2, [(8, 3, 6, 6)], transformed=second)
    # The first result keeps its own size.
    assert {r.ghost_batch_size for r in fxghost.report(first).rewritten} == {4}
    run_side_by_side(model, 4, [(8, 3, 6, 6)], transformed=first)


class _Custom(nn.BatchNorm2d):
    pass


def test_one_short_warning_counts_what_was_not_ghosted() -> None:
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(3, 3, 1), _Custom(3)) for _ in range(5)])
    model.append(nn.BatchNorm2d(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxghost.transform(model, 4)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert text.startswith("fxghost: ghosted 1 of 6 BatchNorm layers of Sequential; 5 need")
    assert "0.1 (_Custom)" in text and "register_batchnorm" in text and "and 2 more" in text
    assert len(text.splitlines()) <= 6 and len(text) < 1000
    assert len(fxghost.report(gm).skipped) == 5


def _no_warning(fn: Callable[[], object]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn()


def test_no_warning_when_everything_is_ghosted() -> None:
    _no_warning(lambda: fxghost.transform(_Net(), 4))
    _no_warning(lambda: fxghost.transform(nn.BatchNorm3d(2), 4))


def test_layer_graph_modules_and_hooks_compile_without_graph_breaks() -> None:
    """A BatchNorm ghosted on its own, under Python that reads shapes, and a layer's hooks:
    ``torch.compile(fullgraph=True)`` takes both, with the reference's results."""
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]] = []
    hooked = _hooked(calls)
    model = nn.ModuleDict({"shape": _ShapeReader(), "hooked": hooked}).double()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = _transform_quietly(model, 4)

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m["hooked"](m["shape"](x).mean((2, 3))[:, :3])

    compiled = torch.compile(lambda x: run(gm, x), backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    y = compiled(x)
    assert [c[0] for c in calls] == ["pre", "post"]
    torch.testing.assert_close(y, run(reference, x))
    assert_same_state(model, reference, "after a compiled step")
