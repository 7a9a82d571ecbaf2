"""PyTorch Lightning: ``Trainer(callbacks=[fxghost.lightning.GhostBatchNorm(g)])`` trains like the
chunked reference in a plain loop (float64, ``precision="64-true"``), validates with plain
BatchNorm eval at any batch size, writes checkpoints that load into the plain module with
``strict=True``, works on a ``torch.compile``\\ d module, and under the ``ddp`` strategy (two CPU
processes on gloo) equals the per-shard reference. A training loader whose last batch is smaller
than the ghost size is refused before the first step (its arithmetic per process, under DDP's
sampler too, is tested against real loaders in ``test_loader.py``).

The DDP test runs this file as a script: Lightning's ``ddp`` strategy starts the other process
by running the same command again, which a pytest process cannot be.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from conftest import assert_state_scaled  # noqa: E402
from test_inplace import Net, make_net  # noqa: E402
from test_torchrun import WORLD, load_rank, simulate_ddp  # noqa: E402

import fxghost  # noqa: E402
from fxghost.lightning import GhostBatchNorm  # noqa: E402
from fxghost.reference import apply_chunked_ghost_batchnorm  # noqa: E402

G = 4
BATCH = 10  # ghost batches of 4, 3 and 3 samples
LR = 0.1
REL = 1e-9


class LitNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.val_outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_outputs.append(self(batch[0]).detach())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def data(n: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 0.5
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


class Spy(L.Callback):
    """What the module looks like while it trains, and the gradients of its last step (Lightning
    sets them to None after the step)."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.report = fxghost.report(pl_module)
        self.stem = pl_module.net.stem
        self.ghosted = "forward" in pl_module.net.stem[1].__dict__

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads = [p.grad.clone() for p in pl_module.parameters()]

    def restore_grads(self, module: nn.Module) -> None:
        for p, g in zip(module.parameters(), self.grads, strict=True):
            p.grad = g


def trainer(**kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "64-true",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
    }
    return L.Trainer(**{**options, **kwargs})


def reference_loop(model: nn.Module, batches: list[Any]) -> nn.Module:
    """The chunked reference driven as Lightning drives the module: zero_grad, forward,
    backward, step."""
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), G).train()
    opt = make_optimizer(reference)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    return reference


def test_fit_validate_and_checkpoint(tmp_path: Path, one_thread: None) -> None:
    lit = LitNet()
    children = dict(lit.net.named_children())
    start = copy.deepcopy(lit.net)
    train_set, val_set = data(3 * BATCH), data(5, seed=1)
    spy = Spy()
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    t = trainer(max_steps=3, callbacks=[GhostBatchNorm(G), spy, ckpt], enable_checkpointing=True)
    t.fit(
        lit,
        DataLoader(train_set, batch_size=BATCH),
        DataLoader(val_set, batch_size=3),  # batches of 3 and 2 samples, below the ghost size
    )
    assert spy.report.rewritten_names == ["net.stem.1", "net.block.bn", "net.head.2"]
    assert spy.stem is children["stem"] and spy.ghosted  # the same modules, ghosted in training...
    assert all(lit.net._modules[k] is v for k, v in children.items())
    assert "forward" not in lit.net.stem[1].__dict__  # ...and plain afterwards

    reference = reference_loop(start, list(DataLoader(train_set, batch_size=BATCH)))
    spy.restore_grads(lit)
    assert_state_scaled(lit.net, reference, "Lightning, after 3 steps", REL)
    # Validation ran after the last step, in eval mode: plain BatchNorm eval.
    reference.eval()
    with torch.no_grad():
        expected = torch.cat([reference(x) for x, _ in DataLoader(val_set, batch_size=3)])
    torch.testing.assert_close(torch.cat(lit.val_outputs), expected, rtol=1e-12, atol=1e-12)

    loaded = LitNet.load_from_checkpoint(tmp_path / "last.ckpt", strict=True)
    for key, value in lit.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # Resuming from it (weights, optimizer momentum, loop state) for a fourth step, the first
    # batch of the next epoch, continues as the reference does.
    resumed, spy = LitNet(), Spy()
    trainer(max_steps=4, callbacks=[GhostBatchNorm(G), spy]).fit(
        resumed, DataLoader(train_set, batch_size=BATCH), ckpt_path=tmp_path / "last.ckpt"
    )
    batches = list(DataLoader(train_set, batch_size=BATCH))
    reference = reference_loop(start, [*batches, batches[0]])
    spy.restore_grads(resumed)
    assert_state_scaled(resumed.net, reference, "Lightning, resumed for a 4th step", REL)


def test_compiled_module(one_thread: None) -> None:
    lit = LitNet()
    start = copy.deepcopy(lit.net)
    train_set, spy = data(2 * BATCH), Spy()
    t = trainer(max_steps=2, callbacks=[GhostBatchNorm(G), spy])
    t.fit(torch.compile(lit, backend="aot_eager"), DataLoader(train_set, batch_size=BATCH))
    reference = reference_loop(start, list(DataLoader(train_set, batch_size=BATCH)))
    spy.restore_grads(lit)
    assert_state_scaled(lit.net, reference, "compiled Lightning module, after 2 steps", REL)


class LateNet(LitNet):
    """Builds its network in ``configure_model``, which Lightning calls after ``setup``."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.val_outputs = []

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = make_net()


def test_layers_built_in_configure_model_and_settings_checked(one_thread: None) -> None:
    lit, spy = LateNet(), Spy()
    trainer(max_steps=1, callbacks=[GhostBatchNorm(G), spy]).fit(
        lit, DataLoader(data(BATCH), batch_size=BATCH)
    )
    assert spy.report.rewritten_names == ["net.stem.1", "net.block.bn", "net.head.2"]
    assert isinstance(lit.net.stem, nn.Sequential)

    # A module the user ghosted before fitting is left to the user, and sizes must agree.
    lit = LitNet()
    fxghost.apply_ghost_batchnorm(lit, G)
    trainer(max_steps=1, callbacks=[GhostBatchNorm(G)]).fit(
        lit, DataLoader(data(BATCH), batch_size=BATCH)
    )
    assert fxghost.report(lit).ghost_batch_size == G
    with pytest.raises(ValueError, match="not with ghost_batch_size=5"):
        trainer(max_steps=1, callbacks=[GhostBatchNorm(5)]).fit(
            lit, DataLoader(data(BATCH), batch_size=BATCH)
        )


class CountingNet(LitNet):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_short_last_batch_fails_before_the_first_step(one_thread: None) -> None:
    # 200 samples in batches of 32: six of 32, then one of 8, below the ghost size of 16.
    train_set = data(200)
    lit = CountingNet()
    with pytest.raises(ValueError) as raised:
        trainer(max_epochs=1, callbacks=[GhostBatchNorm(16)]).fit(
            lit, DataLoader(train_set, batch_size=32)
        )
    assert lit.steps == 0
    message = str(raised.value)
    for part in ["3 BatchNorm layer(s)", "ghost_batch_size=16", "200 samples", "batch_size=32"]:
        assert part in message
    assert "holds 8 sample(s)" in message and "drop_last=True" in message
    with pytest.raises(ValueError):  # reverted: a plain module carries no fxghost report
        fxghost.report(lit)

    # The fixes it names train the whole epoch: drop_last=True (six steps), and a batch size
    # whose last batch holds at least the ghost size (four of 46, then 16).
    for loader, steps in [
        (DataLoader(train_set, batch_size=32, drop_last=True), 6),
        (DataLoader(train_set, batch_size=46), 5),
    ]:
        lit = CountingNet()
        trainer(max_epochs=1, callbacks=[GhostBatchNorm(16)]).fit(lit, loader)
        assert lit.steps == steps

    # Training that stops before the short batch is not refused: limit_train_batches ends the
    # epoch before it, max_steps the fit.
    for limit in [{"limit_train_batches": 6}, {"max_steps": 6}]:
        lit = CountingNet()
        trainer(max_epochs=1, callbacks=[GhostBatchNorm(16)], **limit).fit(
            lit, DataLoader(train_set, batch_size=32)
        )
        assert lit.steps == 6


# --- DDP: two processes started by Lightning's own launcher -------------------------------------

DDP_STEPS = 2


def _ddp_main(out: Path) -> None:
    """Run by each process: fit under the ``ddp`` strategy, save this rank's state."""
    torch.set_num_threads(1)
    lit, spy = LitNet(), Spy()
    t = trainer(
        max_steps=DDP_STEPS, devices=WORLD, strategy="ddp", callbacks=[GhostBatchNorm(G), spy]
    )
    t.fit(lit, DataLoader(data(WORLD * DDP_STEPS * BATCH), batch_size=BATCH))
    spy.restore_grads(lit)
    grads = {n: p.grad for n, p in lit.net.named_parameters()}
    torch.save(
        {"state_dict": lit.net.state_dict(), "grads": grads}, out / f"rank{t.global_rank}.pt"
    )


@pytest.mark.slow
def test_ddp_strategy_matches_per_shard_reference(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        cwd=Path(__file__).parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Lightning puts a DistributedSampler in the training loader, shuffling with seed 0.
    dataset = data(WORLD * DDP_STEPS * BATCH)
    shards = [
        list(DataLoader(dataset, BATCH, sampler=DistributedSampler(dataset, WORLD, r, seed=0)))
        for r in range(WORLD)
    ]
    steps = [[shards[r][s] for r in range(WORLD)] for s in range(DDP_STEPS)]
    replicas = simulate_ddp(make_net(), G, steps, make_optimizer)
    for rank, replica in enumerate(replicas):
        trained = load_rank(tmp_path / f"rank{rank}.pt", Net().double())
        assert_state_scaled(trained, replica, f"Lightning ddp, rank {rank}", REL)


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))
