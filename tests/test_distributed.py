"""DistributedDataParallel (gloo, CPU, 2 processes) over a transformed model.

Each rank forms its ghost batches from its own shard. The expected values come from a
single-process simulation of DDP with the chunked reference: every rank's shard through its own
replica, gradients averaged over ranks, and, with ``broadcast_buffers=True`` (DDP's default),
rank 0's buffers copied to every rank at the start of each forward, as DDP does (its
``forward_sync_buffers``, formerly ``broadcast_buffers``). Both the
transformed model and the chunked reference are run under DDP and compared with it, so the
simulation itself is checked too.

All scenarios run in one pair of processes (starting them costs seconds); each worker records
per-scenario results in JSON files that the tests below read.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import assert_close, conv_mlp, init_bns, run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

WORLD = 2
G = 4
SHARD = {0: 11, 1: 8}  # rank 0: ghost batches of 4, 4, 3; rank 1: 4, 4
STEPS = 2
LR = 0.1
SCENARIOS = ("eager_broadcast", "eager_no_broadcast", "compiled", "small_batch")
JOIN_TIMEOUT_S = 300  # a hang (one rank stuck in a collective) fails instead of blocking CI


def _net() -> nn.Module:
    """A small conv net with BatchNorm2d and BatchNorm1d, in float64; the same on every rank."""
    torch.manual_seed(0)
    return init_bns(conv_mlp().double())


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step and its loss weights, identical on every rank."""
    gen = torch.Generator().manual_seed(100 + step)
    n = sum(SHARD.values())
    x = torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return x, w


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SHARD[r] for r in range(rank))
    return t[start : start + SHARD[rank]]


@dataclass
class Expected:
    """What one rank should see after one step."""

    output: torch.Tensor
    grads: list[torch.Tensor]  # averaged over ranks, in model.parameters() order
    buffers: dict[str, torch.Tensor]  # this rank's buffers after the step


def _simulate(broadcast_buffers: bool) -> list[dict[int, Expected]]:
    """DDP semantics in one process with the chunked reference, one replica per rank."""
    base = _net()
    replicas = {r: apply_chunked_ghost_batchnorm(copy.deepcopy(base), G) for r in range(WORLD)}
    expected: list[dict[int, Expected]] = []
    for step in range(STEPS):
        x, w = _data(step)
        if broadcast_buffers:  # DDP's pre-forward broadcast from rank 0
            for r in range(1, WORLD):
                for b, b0 in zip(replicas[r].buffers(), replicas[0].buffers(), strict=True):
                    b.copy_(b0)
        outputs, grads = {}, {}
        for r, rep in replicas.items():
            rep.train()
            y = rep(_shard(x, r))
            (y * _shard(w, r)).sum().backward()
            outputs[r] = y.detach()
            grads[r] = [p.grad.clone() for p in rep.parameters()]
        avg = [sum(gs) / WORLD for gs in zip(*grads.values(), strict=True)]
        expected.append(
            {r: Expected(outputs[r], avg, _buffers(rep)) for r, rep in replicas.items()}
        )
        for rep in replicas.values():
            _sgd(rep, avg)
    return expected


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    # The reference's names carry an extra ".bn" level; compare by position-stable plain names.
    return {n.replace(".bn.", "."): b.detach().clone() for n, b in model.named_buffers()}


def _sgd(model: nn.Module, grads: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= LR * g
            p.grad = None


class _Failures:
    """Collects comparison failures instead of raising, so that a rank never leaves the
    collectives of a scenario early (the other rank would wait in them until the timeout)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)``; record its AssertionError's first line."""
        try:
            fn(*args)
        except AssertionError as err:
            self.messages.append(str(err).splitlines()[0])

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            self.messages.append(message)


def _run_ddp(
    model: nn.Module,
    params_of: nn.Module,
    rank: int,
    expected: list[dict[int, Expected]],
    broadcast_buffers: bool,
    compiled: bool,
    what: str,
    failures: _Failures,
) -> None:
    """Train ``model`` under DDP on this rank's shards and compare each step with ``expected``."""
    ddp = DDP(model, **_buffer_sync(broadcast_buffers))
    step_fn: Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(ddp, backend="aot_eager") if compiled else ddp
    )
    for step in range(STEPS):
        x, w = _data(step)
        ddp.train()
        y = step_fn(_shard(x, rank))
        (y * _shard(w, rank)).sum().backward()
        exp = expected[step][rank]
        tag = f"{what} rank {rank} step {step}"
        failures.check(assert_close, y.detach(), exp.output, f"{tag}: output")
        grads = [p.grad for p in params_of.parameters()]
        for i, (g, e) in enumerate(zip(grads, exp.grads, strict=True)):
            failures.check(assert_close, g, e, f"{tag}: grad {i}")
        got = _buffers(params_of)
        failures.require(
            sorted(got) == sorted(exp.buffers),
            f"{tag}: buffer names {sorted(got)} != {sorted(exp.buffers)}",
        )
        for name, e in exp.buffers.items():
            b = got.get(name)
            if b is None:
                continue
            if e.dtype == torch.long:
                failures.require(torch.equal(b, e), f"{tag}: {name} {b} != {e}")
            else:
                failures.check(assert_close, b, e, f"{tag}: {name}")
        _sgd(params_of, [p.grad for p in params_of.parameters()])


def _buffer_sync(enabled: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast setting: ``forward_sync_buffers`` where it exists
    (``broadcast_buffers`` is deprecated in its favour), else ``broadcast_buffers``. Both sync
    buffers once at construction, which the simulation's shared initial state agrees with."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": enabled}
    return {"broadcast_buffers": enabled}


def _scenario(name: str, rank: int, failures: _Failures) -> None:
    if name in ("eager_broadcast", "eager_no_broadcast", "compiled"):
        broadcast = name != "eager_no_broadcast"
        expected = _simulate(broadcast)
        compiled = name == "compiled"
        if compiled:
            torch._dynamo.reset()
        model = _net()
        gm = fxghost.transform(model, G)
        _run_ddp(gm, model, rank, expected, broadcast, compiled, f"{name} fxghost", failures)
        if compiled:
            # Really compiled, and no graph break in the model: DDP's own wrapper code
            # (_inside_ddp_forward, its Logger) breaks by design, the wrapped GraphModule must not.
            from torch._dynamo.utils import counters

            graphs = counters["stats"]["unique_graphs"]
            ours = [r for r in counters["graph_break"] if "ghost" in r or "fxghost" in r]
            failures.require(graphs >= 1, "nothing was compiled")
            failures.require(not ours, f"graph breaks in fxghost code: {ours}")
        # The chunked reference under the same DDP setting: checks the simulation itself.
        ref = apply_chunked_ghost_batchnorm(_net(), G)
        _run_ddp(ref, ref, rank, expected, broadcast, False, f"{name} reference", failures)
    elif name == "small_batch":
        model = _net()
        ddp = DDP(fxghost.transform(model, G))
        before = _buffers(model)
        n = 3 if rank == 1 else 8  # only rank 1's shard is smaller than the ghost size
        x = torch.randn(n, 3, 5, 5, dtype=torch.float64)
        if rank == 1:
            try:
                ddp(x)
            except ValueError as err:
                failures.require(
                    "layer '1' (BatchNorm2d) got a training batch of N=3 samples, smaller "
                    "than ghost_batch_size=4" in str(err),
                    f"rank 1: unexpected message: {err}",
                )
            else:
                failures.messages.append("rank 1: a batch of 3 with g=4 did not raise")
            after = _buffers(model)
            for k, b in before.items():
                failures.require(torch.equal(after[k], b), f"rank 1: {k} was updated")
        else:
            # Rank 0's batch is valid; no backward, which would wait for rank 1's gradients.
            y = ddp(x)
            failures.require(y.shape == (8, 3), f"rank 0: output shape {y.shape}")
    else:  # pragma: no cover
        raise ValueError(name)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One DDP process: run every scenario and record its result in ``out_dir``."""
    torch.set_num_threads(1)  # two processes on a small CPU: no oversubscription
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        for name in SCENARIOS:
            failures = _Failures()
            error = None
            start = time.perf_counter()
            try:
                _scenario(name, rank, failures)
            except Exception:
                error = traceback.format_exc()
            result = {
                "failures": failures.messages,
                "error": error,
                "seconds": time.perf_counter() - start,
            }
            Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(result))
            dist.barrier()  # realign the ranks before the next scenario's collectives
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    """Run both ranks once and return each (scenario, rank)'s recorded result."""
    tmp = tmp_path_factory.mktemp("ddp")
    missing = {"failures": [], "error": "no result recorded", "seconds": 0.0}
    args = (str(tmp / "init"), str(tmp))
    return run_ranks(_worker, args, WORLD, SCENARIOS, tmp, JOIN_TIMEOUT_S, missing)


def _assert_ok(results: dict[tuple[str, int], dict[str, Any]], name: str) -> None:
    problems = []
    for rank in range(WORLD):
        r = results[name, rank]
        if r["error"]:
            problems.append(f"rank {rank} raised:\n{r['error']}")
        problems.extend(f"rank {rank}: {m}" for m in r["failures"])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["eager_broadcast", "eager_no_broadcast"])
def test_ddp_matches_reference(results: dict[tuple[str, int], dict[str, Any]], name: str) -> None:
    """Outputs, averaged gradients and each rank's running statistics over two SGD steps, with
    and without DDP's buffer broadcast."""
    _assert_ok(results, name)


def test_ddp_compiled_matches_reference(results: dict[tuple[str, int], dict[str, Any]]) -> None:
    """``torch.compile(DDP(gm), backend="aot_eager")`` against the eager simulation."""
    _assert_ok(results, "compiled")


def test_ddp_batch_smaller_than_ghost_size_raises_on_that_rank(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    """Rank 1's shard of 3 samples with g=4 raises fxghost's ValueError there, leaving its
    running statistics untouched; rank 0's valid shard runs."""
    _assert_ok(results, "small_batch")


if os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="file:// rendezvous and spawn tested on POSIX only")
