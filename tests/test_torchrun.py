"""``torchrun --nproc_per_node=2 examples/train_ddp.py --device cpu``: a real DDP training script
(gloo, two CPU processes) equal to the chunked reference run per shard.

:func:`simulate_ddp` is DDP's semantics in one process with the chunked reference: one replica per
rank on its own shard, gradients averaged over ranks, and rank 0's buffers copied to every rank
before each forward (DDP's default ``broadcast_buffers=True``). tests/test_lightning.py uses it
for Lightning's ``ddp`` strategy too.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import assert_state_scaled
from torch import nn

from fxghost.reference import apply_chunked_ghost_batchnorm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_ddp.py"
WORLD = 2
#: The command line of docs/trainers.md (tests/test_readme_trainers.py checks that it is this
#: one); the test adds small sizes and float64.
README_COMMAND = "torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --device cpu"
# float64 through ResNet-18's twenty BatchNorms with ghost batches of 5 samples on 1x1
# maps: rounding is about 1e-12 of each tensor's scale.
REL = 1e-8

Batch = tuple[torch.Tensor, torch.Tensor]


def simulate_ddp(
    model: nn.Module,
    ghost_batch_size: int,
    steps: Iterable[Sequence[Batch]],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> list[nn.Module]:
    """Train one chunked-reference replica of ``model`` per rank as DDP would, with
    cross-entropy on each step's per-rank (inputs, labels); returns the replicas, holding the
    last step's averaged gradients."""
    replicas: list[nn.Module] = []
    optimizers = []
    for _ in range(WORLD):
        replica = apply_chunked_ghost_batchnorm(copy.deepcopy(model), ghost_batch_size).train()
        replicas.append(replica)
        optimizers.append(make_optimizer(replica))
    for per_rank in steps:
        for replica in replicas[1:]:  # DDP's pre-forward broadcast of rank 0's buffers
            for b, b0 in zip(replica.buffers(), replicas[0].buffers(), strict=True):
                b.copy_(b0)
        for replica, opt, (x, y) in zip(replicas, optimizers, per_rank, strict=True):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(replica(x), y).backward()
        grads = [[p.grad for p in r.parameters()] for r in replicas]
        mean = [sum(gs) / WORLD for gs in zip(*grads, strict=True)]
        for replica, opt in zip(replicas, optimizers, strict=True):
            for p, g in zip(replica.parameters(), mean, strict=True):
                p.grad = g.clone()
            opt.step()
    return replicas


def load_rank(path: Path, model: nn.Module) -> nn.Module:
    """``model`` holding a rank's saved state and gradients."""
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["state_dict"], strict=True)
    for name, p in model.named_parameters():
        p.grad = saved["grads"].get(name)
    return model


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_ddp", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun() -> list[str]:
    """The ``torchrun`` of this Python's environment (it is ``torch.distributed.run``)."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _run_readme_command(*args: str) -> subprocess.CompletedProcess[str]:
    """The documented command line with ``args`` added, from the repository's root."""
    _, *readme_args = README_COMMAND.split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*torchrun(), *readme_args, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_loss_falls_with_the_default_learning_rate() -> None:
    """The example trains as it ships: its default learning rate (with 0.1 the mean loss rises
    from 2.9 to 10 here), with a smaller batch and fewer steps than its defaults for speed."""
    proc = _run_readme_command("--steps", "21", "--batch-size", "16", "--ghost-batch-size", "8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Step 0's loss, then the means of steps 1-10 and 11-20.
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 3, proc.stdout
    assert losses == sorted(losses, reverse=True), proc.stdout
    assert losses[-1] < 0.6 * losses[0], proc.stdout


@pytest.mark.slow
def test_torchrun_matches_per_shard_reference(tmp_path: Path) -> None:
    args = [
        "--steps",
        "2",
        "--batch-size",
        "10",
        "--ghost-batch-size",
        "5",
        "--image-size",
        "16",
        "--dtype",
        "float64",
        "--out",
        str(tmp_path),
    ]
    proc = _run_readme_command(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "20 layer(s) rewritten with ghost_batch_size=5" in proc.stdout, proc.stdout
    assert "step 1: mean loss" in proc.stdout

    script = _script()
    ns = script.parse_args(["--device", "cpu", *args])
    model = script.make_model(ns.seed).double()
    steps = [[(x.double(), y) for x, y in per_rank] for per_rank in script.shards(ns, WORLD)]
    replicas = simulate_ddp(
        model, ns.ghost_batch_size, steps, lambda m: script.make_optimizer(m, ns.lr)
    )
    for rank, replica in enumerate(replicas):
        trained = load_rank(tmp_path / f"rank{rank}.pt", script.make_model(ns.seed).double())
        assert_state_scaled(trained, replica, f"rank {rank} after 2 steps", REL)
