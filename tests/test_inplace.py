"""The in-place API: ``fxghost.apply_ghost_batchnorm(model, g)`` gives each BatchNorm of ``model``
its ghost forward and replaces no module; ``fxghost.revert_ghost_batchnorm(model)`` takes it away.
Training through the applied model equals the chunked reference in float64."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conftest import assert_state_scaled, init_bns
from torch import nn

import fxghost
from fxghost._inplace import is_applied
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

G = 4
REL = 1e-9


class Branchy(nn.Module):
    """A forward that branches on a tensor's value, so it does not trace (nothing is traced in
    place: its BatchNorm is ghosted all the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if float(y.detach().abs().sum()) > 1e12:  # data-dependent control flow
            y = y * 0
        return torch.relu(y)


class Net(nn.Module):
    """A model a framework would hold: attributes, a method and a forward of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Branchy()
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)
        )
        self.temperature = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x))) / self.temperature

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(1)


def make_net() -> Net:
    torch.manual_seed(0)
    return init_bns(Net().double())


def batch(step: int, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 0.5
    return x, torch.randint(0, 3, (n,), generator=gen)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """A plain loop; the last step's gradients are kept for comparison."""
    model.train()
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_trains_like_the_reference_with_an_optimizer_built_before() -> None:
    model = make_net()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), G)
    params = list(model.parameters())
    keys = list(model.state_dict())
    modules = dict(model.named_modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)

    assert fxghost.apply_ghost_batchnorm(model, ghost_batch_size=G, optimizers=opt) is model
    assert type(model) is Net and model.temperature == 2.0
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys
    rep = fxghost.report(model)
    assert rep.rewritten_names == ["stem.1", "block.bn", "head.2"], rep.table()
    assert dict(model.named_modules()) == modules  # the same objects at the same paths

    train(model, opt)
    train(reference, ref_opt)
    assert_state_scaled(model, reference, "after 3 SGD steps", REL)

    # Eval is plain BatchNorm eval, at any batch size (one sample here, below the ghost size).
    model.eval()
    reference.eval()
    x, _ = batch(9, n=1)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)
    assert model.predict(x).shape == (1,)


def test_revert_leaves_every_module_in_place_with_the_current_state() -> None:
    model = make_net().float()
    modules = dict(model.named_modules())
    types = {name: type(m) for name, m in modules.items()}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    fxghost.apply_ghost_batchnorm(model, G)
    assert dict(model.named_modules()) == modules
    assert {name: type(m) for name, m in model.named_modules()} == types
    # .double() replaces every buffer tensor (as Lightning's 64-bit precision and .to(device)
    # do); training then updates those.
    model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt, steps=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    model.eval()
    assert fxghost.revert_ghost_batchnorm(model) is model
    assert dict(model.named_modules()) == modules
    assert not any("forward" in bn.__dict__ or "extra_repr" in bn.__dict__ for bn in bns)
    assert not model.training and not any(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    assert int(bns[0].num_batches_tracked) == 6  # 2 steps of 3 ghost batches
    with pytest.raises(ValueError, match="carries no fxghost report"):
        fxghost.report(model)
    with pytest.raises(ValueError, match="no ghost BatchNorm applied"):
        fxghost.revert_ghost_batchnorm(model)
    # Applied again after a revert, with another size.
    fxghost.apply_ghost_batchnorm(model, 5)
    assert fxghost.report(model).ghost_batch_size == 5


def test_applying_twice() -> None:
    model = make_net()
    fxghost.apply_ghost_batchnorm(model, G)
    children = list(model.children())
    rep = fxghost.report(model)
    assert fxghost.apply_ghost_batchnorm(model, G) is model  # same size: nothing happens
    assert all(a is b for a, b in zip(model.children(), children, strict=True))
    assert fxghost.report(model) is rep
    with pytest.raises(ValueError, match=r"with ghost_batch_size=4, not with ghost_batch_size=8;"):
        fxghost.apply_ghost_batchnorm(model, 8)
    with pytest.raises(ValueError, match=r"not with ghost_batch_size=4, only=\['head.\*'\]"):
        fxghost.apply_ghost_batchnorm(model, G, only=["head.*"])
    fxghost.revert_ghost_batchnorm(model)
    model.train()
    x, _ = batch(0)
    model(x)
    assert int(model.head[2].num_batches_tracked) == 1  # plain again: one batch, not three


def test_refused_and_unwrapped_models() -> None:
    with pytest.raises(ValueError, match="produced by fxghost.transform"):
        fxghost.apply_ghost_batchnorm(fxghost.transform(make_net(), G), G)
    with pytest.raises(TypeError, match="takes a torch.nn.Module"):
        fxghost.apply_ghost_batchnorm("resnet18", G)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ghost_batch_size"):
        fxghost.apply_ghost_batchnorm(make_net(), 0)
    model = make_net()
    with pytest.raises(ValueError, match="matches no rewritable"):
        fxghost.apply_ghost_batchnorm(model, G, only=["nothing.*"])
    assert not is_applied(model) and "forward" not in model.stem[1].__dict__
    # A BatchNorm itself, and a DataParallel wrapper (its module is ghosted: no module is
    # replaced, so what the wrapper holds stays valid).
    bn = nn.BatchNorm1d(3)
    assert fxghost.apply_ghost_batchnorm(bn, 2) is bn
    bn(torch.randn(4, 3))
    assert int(bn.num_batches_tracked) == 2
    wrapped = nn.DataParallel(model)
    fxghost.apply_ghost_batchnorm(wrapped, G)
    assert fxghost.report(model).rewritten_names == ["stem.1", "block.bn", "head.2"]
    fxghost.revert_ghost_batchnorm(wrapped)
    assert "forward" not in model.stem[1].__dict__


def test_only_hooks_and_shared_children() -> None:
    model = make_net()
    model.alias = model.head  # the same child under two names
    seen: list[tuple[int, ...]] = []
    handle = model.stem.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    fxghost.apply_ghost_batchnorm(model, G, only=["stem.*", "head.*"])
    assert fxghost.report(model).rewritten_names == ["stem.1", "head.2"]
    assert model.alias is model.head and isinstance(model.head, nn.Sequential)
    assert "forward" not in model.block.bn.__dict__  # not selected: untouched
    x, _ = batch(0)
    model(x)
    assert seen == [(10, 4, 5, 5)]  # a hook on a container fires once per call
    handle.remove()
    model(x)
    assert len(seen) == 1
    head = fxghost.revert_ghost_batchnorm(model).head
    assert model.alias is head and "forward" not in head[2].__dict__


def test_copies_and_checkpoints_between_plain_and_applied() -> None:
    plain = make_net()
    model = fxghost.apply_ghost_batchnorm(copy.deepcopy(plain), G)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    # Both ways with strict=True: the keys are the plain model's.
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert fxghost.report(duplicate).rewritten_names == fxghost.report(model).rewritten_names
        reverted = fxghost.revert_ghost_batchnorm(duplicate)
        assert isinstance(reverted.stem, nn.Sequential)
        for key, value in reverted.state_dict().items():
            assert torch.equal(value, plain.state_dict()[key]), key
        # The copy's originals, not the model's.
        assert reverted.stem[1].weight is not model.get_submodule("stem.1").weight


def test_one_warning_naming_the_caller() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.BatchNorm1d(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxghost.apply_ghost_batchnorm(model, G)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert issubclass(caught[0].category, fxghost.PartialRewriteWarning)
    assert caught[0].filename == __file__
    assert "ghosted 1 of 2" in str(caught[0].message)


def test_compiled_module_is_rewritten_under_the_compiled_one() -> None:
    model = make_net()
    model.block = nn.Sequential(model.block.conv, model.block.bn, nn.ReLU())  # traces
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), G)
    compiled = torch.compile(model, backend="aot_eager")
    assert fxghost.apply_ghost_batchnorm(compiled, G) is compiled
    assert fxghost.report(model).rewritten_names == ["stem.1", "block.1", "head.2"]
    train(compiled, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.1), steps=2)
    assert_state_scaled(model, reference, "compiled, after 2 steps", REL)
    fxghost.revert_ghost_batchnorm(compiled)
    assert isinstance(model.block, nn.Sequential)


def test_applying_with_other_backend_or_group_is_refused_and_backend_reaches_the_graph() -> None:
    """Settings other than those applied (here the backend) are refused, not silently kept; the
    chosen backend is the one that runs."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)).double()
    fxghost.apply_ghost_batchnorm(model, 4, backend="torch")
    fxghost.apply_ghost_batchnorm(model, 4, backend="torch")  # the same settings: a no-op
    with pytest.raises(ValueError, match="backend='torch'.*revert_ghost_batchnorm"):
        fxghost.apply_ghost_batchnorm(model, 4)
    model(torch.randn(8, 4, dtype=torch.float64))
    assert [r.backend for r in fxghost.report(model).rewritten] == ["torch"]
