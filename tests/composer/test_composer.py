"""MosaicML Composer: ``Trainer(algorithms=[fxghost.composer.GhostBatchNorm(g)])`` trains like the
chunked reference (float64), and like Composer's own ``GhostBatchNorm`` algorithm, whose place it
takes: checkpoints keep plain keys and load into a plain model through Composer's own loading,
and eval runs at a batch smaller than the ghost size, where Composer's algorithm raises. A
training dataloader whose last batch (or microbatch) is smaller than the ghost size is refused at
``Event.FIT_START``, before the first step.

Composer pins an older torch, so these tests run in their own environment: ``make test-composer``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# composer.core, not composer: with tests/ on sys.path (pytest's rootdir import), this folder is a
# namespace package named composer wherever the real one is not installed.
pytest.importorskip("composer.core")

from composer import Callback, Trainer  # noqa: E402
from composer.algorithms import GhostBatchNorm as ComposerGhostBatchNorm  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from conftest import assert_state_scaled, conv_mlp, init_bns  # noqa: E402

import fxghost  # noqa: E402
import fxghost.composer  # noqa: E402
from fxghost.reference import apply_chunked_ghost_batchnorm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

G = 4
BATCH = 10  # ghost batches of 4, 3 and 3 samples
STEPS = 3
LR = 0.1
REL = 1e-9


def make_net() -> nn.Module:
    """Conv and BatchNorm2d, then Linear and BatchNorm1d; float64, non-trivial BatchNorm state."""
    torch.manual_seed(0)
    return init_bns(conv_mlp().double())


def classifier(net: nn.Module) -> ComposerClassifier:
    return ComposerClassifier(net, num_classes=3, loss_fn=nn.functional.cross_entropy)


def data(n: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 0.5
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


class LastGrads(Callback):
    """The gradients of the last step, as the optimizer saw them."""

    def after_backward(self, state: Any, logger: Any) -> None:
        self.grads = [p.grad.clone() for p in state.model.parameters()]


def fit(model: ComposerClassifier, algorithms: list[Any], folder: Path | None = None) -> Any:
    spy = LastGrads()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data(STEPS * BATCH), batch_size=BATCH),
        max_duration=f"{STEPS}ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9),
        algorithms=algorithms,
        callbacks=[spy],
        device="cpu",
        precision="fp32",  # no autocast: the model and data are float64
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        save_folder=None if folder is None else str(folder),
        save_filename="ba{batch}.pt",
        save_interval=f"{STEPS}ba",
        seed=0,
    )
    trainer.fit()
    for p, g in zip(model.parameters(), spy.grads, strict=True):
        p.grad = g
    return trainer


def reference_loop(net: nn.Module) -> nn.Module:
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(net), G).train()
    opt = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
    for x, y in DataLoader(data(STEPS * BATCH), batch_size=BATCH):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    return reference


def test_trains_like_reference_and_checkpoints_load_plain(tmp_path: Path) -> None:
    model = classifier(make_net())
    start = copy.deepcopy(model.module)
    keys = list(model.state_dict())
    trainer = fit(model, [fxghost.composer.GhostBatchNorm(G)], tmp_path)
    assert fxghost.report(model).rewritten_names == ["module.1", "module.5"]
    assert list(model.state_dict()) == keys
    assert_state_scaled(model.module, reference_loop(start), "Composer, after 3 steps", REL)

    # Eval at a batch below the ghost size: plain BatchNorm eval.
    val = data(5, seed=1)
    trainer.eval(eval_dataloader=DataLoader(val, batch_size=3))
    model.eval()
    plain = copy.deepcopy(start).eval()
    plain.load_state_dict(model.module.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.module(val.tensors[0]), plain(val.tensors[0]))

    # The checkpoint holds plain keys, and Composer resumes from it into a plain model without
    # adding an algorithm (were the class named GhostBatchNorm, Composer would add its own
    # GhostBatchNorm here, whose surgery then fails to load these keys).
    checkpoint = tmp_path / f"ba{STEPS}.pt"
    saved = torch.load(checkpoint, weights_only=False)["state"]
    assert sorted(saved["model"]) == sorted(keys)
    assert saved["algorithms"][0][0] == "FxGhostBatchNorm"
    fresh = classifier(make_net())
    resumed = Trainer(
        model=fresh,
        load_path=str(checkpoint),
        device="cpu",
        train_dataloader=DataLoader(data(STEPS * BATCH), batch_size=BATCH),
        max_duration=f"{STEPS + 1}ba",
        optimizers=torch.optim.SGD(fresh.parameters(), lr=LR),
        progress_bar=False,
        log_to_console=False,
        loggers=[],
    )
    assert resumed.state.algorithms == [] and isinstance(fresh.module[1], nn.BatchNorm2d)
    assert int(resumed.state.timestamp.batch) == STEPS
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_side_by_side_with_composers_own_algorithm(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = classifier(make_net()), classifier(make_net())
    with caplog.at_level(logging.INFO, logger="fxghost.composer"):
        fit(ours, [fxghost.composer.GhostBatchNorm(G)])
    assert "2 BatchNorm layer(s) ghosted" in caplog.text
    fit(theirs, [ComposerGhostBatchNorm(G)])
    # The same training; Composer's surgery renames every BatchNorm key.
    renamed = {k.replace(".batchnorm.", "."): v for k, v in theirs.state_dict().items()}
    assert sorted(renamed) == sorted(ours.state_dict()) != sorted(theirs.state_dict())
    theirs_plain = make_net()
    theirs_plain.load_state_dict({k[len("module.") :]: v for k, v in renamed.items()})
    for p, q in zip(theirs_plain.parameters(), theirs.parameters(), strict=True):
        p.grad = q.grad
    assert_state_scaled(ours.module, theirs_plain, "fxghost against Composer's algorithm", REL)

    ours.eval()
    theirs.eval()
    x = data(3, seed=2).tensors[0]
    with torch.no_grad():
        ours.module(x)  # a batch of 3 with ghost size 4: plain eval
        with pytest.raises(ValueError, match="Worker batch size 3 < ghost_batch_size 4"):
            theirs.module(x)


def test_functional_api_is_one_import_away() -> None:
    import composer.functional as cf

    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    # composer.functional.apply_ghost_batchnorm(model, ghost_batch_size=G, optimizers=opt) becomes:
    fxghost.apply_ghost_batchnorm(model, ghost_batch_size=G, optimizers=opt)
    assert len(fxghost.report(model).rewritten) == 2
    assert callable(cf.apply_ghost_batchnorm)
    params = opt.param_groups[0]["params"]
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def test_readme_block() -> None:
    """The README's Composer snippet, as written, with a small stand-in model and loader."""
    from test_readme_trainers import G as README_G
    from test_readme_trainers import loader, run_block, small_classifier

    model = ComposerClassifier(small_classifier(), num_classes=10)
    run_block("composer", {"composer_model": model, "train_loader": loader()})
    assert fxghost.report(model).ghost_batch_size == README_G
    bn = model.get_submodule("module.1")
    assert int(bn.num_batches_tracked) == 4  # two steps of two ghost batches


class Steps(Callback):
    """Counts the training forwards (one per microbatch)."""

    def __init__(self) -> None:
        self.count = 0

    def before_forward(self, state: Any, logger: Any) -> None:
        self.count += 1


def fit_loader(
    loader: DataLoader, g: int, steps: Steps | None = None, **kwargs: Any
) -> tuple[ComposerClassifier, int]:
    model, counter = classifier(make_net()), steps or Steps()
    options: dict[str, Any] = {"max_duration": "1ep", **kwargs}
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.SGD(model.parameters(), lr=LR),
        algorithms=[fxghost.composer.GhostBatchNorm(g)],
        callbacks=[counter],
        device="cpu",
        precision="fp32",
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        seed=0,
        **options,
    )
    try:
        trainer.fit()
    finally:
        trainer.close()
    return model, counter.count


def test_short_last_batch_or_microbatch_fails_before_the_first_step() -> None:
    # 200 samples in batches of 32: six of 32, then one of 8, below the ghost size of 16.
    train_set = data(200)
    steps = Steps()
    with pytest.raises(ValueError) as raised:
        fit_loader(DataLoader(train_set, batch_size=32), 16, steps)
    assert steps.count == 0
    message = str(raised.value)
    for part in ["2 BatchNorm layer(s)", "ghost_batch_size=16", "200 samples", "batch_size=32"]:
        assert part in message
    assert "holds 8 sample(s)" in message and "drop_last=True" in message

    # Microbatches of 12 split each batch of 32 into 12, 12 and 8.
    with pytest.raises(ValueError, match="device_train_microbatch_size=12") as raised:
        fit_loader(
            DataLoader(train_set, batch_size=32, drop_last=True),
            16,
            device_train_microbatch_size=12,
        )
    assert "microbatch of 8 sample(s)" in str(raised.value)

    # The fixes it names train the whole epoch: drop_last=True (six batches), a batch size whose
    # last batch holds at least the ghost size (four of 46, then 16), microbatches of 16.
    for loader, kwargs, forwards in [
        (DataLoader(train_set, batch_size=32, drop_last=True), {}, 6),
        (DataLoader(train_set, batch_size=46), {}, 5),
        (
            DataLoader(train_set, batch_size=32, drop_last=True),
            {"device_train_microbatch_size": 16},
            12,
        ),
    ]:
        model, count = fit_loader(loader, 16, **kwargs)
        assert count == forwards
        assert fxghost.report(model).ghost_batch_size == 16

    # Training that stops before the short batch is not refused: train_subset_num_batches ends
    # the epoch before it, a max_duration of 6 batches the fit.
    for kwargs in [{"train_subset_num_batches": 6}, {"max_duration": "6ba"}]:
        assert fit_loader(DataLoader(train_set, batch_size=32), 16, **kwargs)[1] == 6
