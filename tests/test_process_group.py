"""Ghost batches across processes (``transform(..., process_group=pg)``): 4 CPU processes, gloo.

Every rank builds each case's global batch from a seed, runs its own slice through the transformed
model, and compares, in float64, with the chunked reference applied in one process to its group's
concatenated batch (groups are consecutive ranks): its slice of the output and of the input
gradient, the parameter gradients (summed over the group, or as DDP averages them over all four
processes), and the buffers, which must also be bitwise the same on every process of the group.

All cases run in one spawn of four processes (starting them costs seconds); each rank records
per-case results that the tests below read. The documented recipe (docs/process-groups.md) runs
apart, as its own script under torchrun with two processes, as the page says to run it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import subprocess
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
from bn_layers import without_bias
from conftest import STATS32_TOL, assert_close, assert_ulp_close, conv_mlp, init_bns, run_ranks
from test_torchrun import torchrun
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxghost
from fxghost.backends import cpu
from fxghost.reference import apply_chunked_ghost_batchnorm

WORLD = 4
LR = 0.1
JOIN_TIMEOUT_S = 400  # a hang (one rank stuck in a collective) fails instead of blocking CI


@dataclass(frozen=True)
class Case:
    """One scenario: the net, the group size, each rank's batch size and the ghost size."""

    net: str  # a key of NETS
    group: int  # processes per group: consecutive ranks
    sizes: tuple[int, ...]  # each rank's batch size
    g: int
    momentum: float | None = 0.1
    mode: str = "eager"  # or a torch.compile backend: "aot_eager", "inductor"
    ddp: bool | None = None  # None: no DDP; else DDP with per-forward buffer broadcast on/off
    channels_last: bool = False
    steps: int = 2
    dynamic: bool = False  # torch.compile(dynamic=True): the batch size symbolic
    inplace: bool = False  # fxghost.apply_ghost_batchnorm instead of transform


# Ghost batches of each group's concatenated batch, as chunk(ceil(N/g)) cuts it, in comments.
CASES: dict[str, Case] = {
    # Below the ghost size. Group 0: N=8 (3+5), 4 on ranks 0-1 and 4 on rank 1; group 1: N=4
    # (2+2), one ghost batch over both.
    "below_g_groups_of_2": Case("2d", 2, (3, 5, 2, 2), 4),
    # Equal to the ghost size: each ghost batch within one process; cumulative average.
    "equal_g_group_of_4_momentum_none": Case("2d", 4, (4, 4, 4, 4), 4, momentum=None),
    # Above the ghost size, unequal: N=24 (6+7+5+6), ghost batches 5, 5, 5, 5, 4, three of them
    # straddling two processes, a short last one.
    "above_g_unequal_straddling": Case("2d", 4, (6, 7, 5, 6), 5),
    # Group 0: N=19 (9+10) -> 4, 4, 4, 4, 3; group 1: N=7 (7+0) -> 4, 3 on rank 2, rank 3 empty.
    "unequal_with_empty_process": Case("1d", 2, (9, 10, 7, 0), 4),
    # channels_last BatchNorm2d; N=12 (3+3+3+3) -> 6 on ranks 0-1, 6 on ranks 2-3.
    "channels_last": Case("2d", 4, (3, 3, 3, 3), 8, channels_last=True),
    # BatchNorm3d and BatchNorm1d (N, C, L) without affine parameters; per group N=8 -> 3, 3, 2
    # (5+3 and 4+4).
    "bn3d_and_bn1d_ncl": Case("3d", 2, (5, 3, 4, 4), 3, momentum=None),
    "compiled_aot_eager": Case("2d", 4, (6, 7, 5, 6), 5, mode="aot_eager", dynamic=True),
    "compiled_inductor": Case("1d", 2, (3, 5, 2, 2), 4, mode="inductor", steps=1),
    "ddp_broadcast_buffers": Case("2d", 2, (3, 5, 4, 4), 4, ddp=True),
    "ddp_no_broadcast_buffers": Case("2d", 2, (3, 5, 6, 2), 4, momentum=None, ddp=False),
    "ddp_compiled_aot_eager": Case("2d", 2, (3, 5, 4, 4), 4, mode="aot_eager", ddp=False),
    "inplace_api": Case("2d", 2, (3, 5, 2, 2), 4, inplace=True, steps=1),
    # A group of one process: each process's own batch, as without a group.
    "group_of_one": Case("2d", 1, (5, 4, 6, 4), 4, steps=1),
    # Layers without a bias (bias=False) and without a weight (set to None); N=8 (5+3) -> 4, 4
    # and N=8 (4+4) -> 4, 4, a ghost batch straddling ranks 0-1.
    "missing_parameters": Case("partial", 2, (5, 3, 4, 4), 4),
    "missing_parameters_compiled": Case("partial", 2, (3, 5, 2, 2), 4, mode="aot_eager", steps=1),
    # Group 1 trains on an empty batch (N=0: 0+0): no ghost batch, an empty output, nothing
    # updated, as the reference on the empty concatenated batch.
    "empty_group_in_training": Case("partial", 2, (5, 3, 0, 0), 4),
}
SPECIAL = (
    "bfloat16",
    "eval",
    "eval_without_running_stats",
    "single_value_per_channel",
    "group_smaller_than_g",
    "one_process_fails_input_check",
    "report",
    "double_backward",
    "functional_collective_input",
)
SCENARIOS = (*CASES, *SPECIAL)


def _init_bn(net: nn.Module, momentum: float | None) -> nn.Module:
    for m in init_bns(net).modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return net


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    # (a builder, the shape of one input sample)
    "2d": (conv_mlp, (3, 5, 5)),
    "1d": (lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)), (5,)),
    "3d": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, 1),
            nn.BatchNorm3d(3),
            nn.ReLU(),
            nn.Flatten(2),
            nn.BatchNorm1d(3, affine=False),
        ),
        (2, 2, 3, 2),
    ),
    "bn1d": (lambda: nn.Sequential(nn.BatchNorm1d(6)), (6,)),
    "partial": (
        lambda: nn.Sequential(
            nn.Linear(5, 6, bias=False),
            without_bias(nn.BatchNorm1d, 6),
            nn.ReLU(),
            nn.Linear(6, 4, bias=False),
            _without_weight(nn.BatchNorm1d(4)),
        ),
        (5,),
    ),
}


def _without_weight(bn: nn.Module) -> nn.Module:
    bn.weight = None  # a bias only, as BatchNorm allows
    return bn


def _net(kind: str, momentum: float | None = 0.1, channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = _init_bn(NETS[kind][0]().double(), momentum)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _batch(kind: str, start: int, n: int, step: int, channels_last: bool = False) -> torch.Tensor:
    """Samples ``start .. start + n`` of a step's global batch (the same on every rank)."""
    gen = torch.Generator().manual_seed(1000 * step + 7)
    # Always the same number of draws: randn's stream depends on how many values it makes.
    every = torch.randn(64, *NETS[kind][1], generator=gen, dtype=torch.float64) * 2 + 0.5
    x = every[start : start + n].clone()
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _loss_weights(start: int, y: torch.Tensor, step: int) -> torch.Tensor:
    """Weights of a loss sum(y * w) for output samples ``start ..``: a fixed function of the
    global position, so that each rank's slice of it is the reference's."""
    per = y[0].numel() if y.shape[0] else int(torch.tensor(y.shape[1:]).prod())
    idx = torch.arange(start * per, (start + y.shape[0]) * per, dtype=torch.float64)
    return torch.sin(0.37 * idx + step).view(y.shape)


def _offsets(sizes: tuple[int, ...]) -> list[int]:
    return [sum(sizes[:r]) for r in range(len(sizes))]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    # The reference's names carry an extra ".bn" level.
    return {
        n.replace(".bn.", ".").removesuffix(".bn"): b.detach().clone()
        for n, b in model.named_buffers()
    }


@dataclass
class Expected:
    output: torch.Tensor  # the group's
    input_grad: torch.Tensor
    grads: list[torch.Tensor]  # the group's (summed), or DDP's world average
    buffers: dict[str, torch.Tensor]


def _reference(case: Case) -> list[dict[int, Expected]]:
    """Per step, per group: the chunked reference on the group's concatenated batch."""
    base = _net(case.net, case.momentum, case.channels_last)
    groups = range(WORLD // case.group)
    replicas = {i: apply_chunked_ghost_batchnorm(copy.deepcopy(base), case.g) for i in groups}
    offsets = _offsets(case.sizes)
    out: list[dict[int, Expected]] = []
    for step in range(case.steps):
        if case.ddp:  # DDP's per-forward buffer broadcast from rank 0 (group 0)
            for i in groups:
                for b, b0 in zip(replicas[i].buffers(), replicas[0].buffers(), strict=True):
                    b.copy_(b0)
        found: dict[int, Expected] = {}
        for i, rep in replicas.items():
            first = i * case.group
            start, n = offsets[first], sum(case.sizes[first : first + case.group])
            x = _batch(case.net, start, n, step, case.channels_last).requires_grad_()
            rep.train()
            y = rep(x)
            (y * _loss_weights(start, y, step)).sum().backward()
            found[i] = Expected(
                y.detach(), x.grad, [p.grad.clone() for p in rep.parameters()], _buffers(rep)
            )
        if case.ddp is not None:
            avg = [sum(gs) / WORLD for gs in zip(*(e.grads for e in found.values()), strict=True)]
            for e in found.values():
                e.grads = avg
        for i, rep in replicas.items():
            with torch.no_grad():
                for p, g in zip(rep.parameters(), found[i].grads, strict=True):
                    p -= LR * g
                    p.grad = None
        out.append(found)
    return out


class _Failures:
    """Collects comparison failures instead of raising, so that a rank never leaves the
    collectives of a scenario early (the others would wait in them until the timeout)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.notes: dict[str, Any] = {}

    def check(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except AssertionError as err:
            self.messages.append(" | ".join(str(err).splitlines()[:4]))

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            self.messages.append(message)


def _buffer_sync(enabled: bool) -> dict[str, bool]:
    """DDP's per-forward buffer broadcast setting, under the name this torch has."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": enabled}
    return {"broadcast_buffers": enabled}


class Groups:
    """This rank's process groups, by size; created once, by every rank in the same order."""

    def __init__(self) -> None:
        self.by_size = {
            1: dist.new_subgroups(1)[0],
            2: dist.new_subgroups(2)[0],
            4: dist.new_group(list(range(WORLD))),
        }


def _same_across(tensors: list[torch.Tensor], group: Any) -> bool:
    """Whether every process of ``group`` holds bitwise the same ``tensors``."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    return all(torch.equal(t, flat) for t in gathered)


def _run_case(case: Case, rank: int, groups: Groups, f: _Failures) -> None:
    expected = _reference(case)
    group = groups.by_size[case.group]
    model = _net(case.net, case.momentum, case.channels_last)
    bn_layout: list[bool] = []
    if case.channels_last:
        model[2].register_forward_hook(
            lambda m, args, out: bn_layout.append(
                args[0].is_contiguous(memory_format=torch.channels_last)
            )
        )
    if case.inplace:
        gm = fxghost.apply_ghost_batchnorm(model, case.g, process_group=group)
    else:
        gm = fxghost.transform(model, case.g, process_group=group)
    runner: nn.Module = gm
    if case.ddp is not None:
        runner = DDP(gm, **_buffer_sync(case.ddp))
    if case.mode != "eager":
        torch._dynamo.reset()
        # fullgraph: no graph break in the model (DDP's own wrapper code breaks by design).
        runner = torch.compile(
            runner, backend=case.mode, fullgraph=case.ddp is None, dynamic=case.dynamic or None
        )
    offset, n = _offsets(case.sizes)[rank], case.sizes[rank]
    start = _offsets(case.sizes)[rank - rank % case.group]
    for step in range(case.steps):
        exp = expected[step][rank // case.group]
        x = _batch(case.net, offset, n, step, case.channels_last).requires_grad_()
        runner.train()
        y = runner(x)
        (y * _loss_weights(offset, y, step)).sum().backward()
        tag = f"rank {rank} step {step}"
        mine = slice(offset - start, offset - start + n)
        f.check(assert_close, y.detach(), exp.output[mine], f"{tag}: output")
        f.check(assert_close, x.grad, exp.input_grad[mine], f"{tag}: input grad")
        grads = [p.grad.clone() for p in model.parameters()]
        if case.ddp is None:  # each process holds its partial sums: the group's total is the sum
            for g in grads:
                dist.all_reduce(g, group=group)
        for i, (g, e) in enumerate(zip(grads, exp.grads, strict=True)):
            f.check(assert_close, g, e, f"{tag}: grad {i}")
        got = _buffers(model)
        f.require(sorted(got) == sorted(exp.buffers), f"{tag}: buffers {sorted(got)}")
        for name, e in exp.buffers.items():
            if e.dtype == torch.long:
                f.require(torch.equal(got[name], e), f"{tag}: {name} {got[name]} != {e}")
            else:
                f.check(assert_close, got[name], e, f"{tag}: {name}")
        f.require(
            _same_across(list(model.buffers()), group),
            f"{tag}: buffers differ between the processes of the group",
        )
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= LR * g
                p.grad = None
    if case.channels_last:
        f.require(bool(bn_layout) and all(bn_layout), f"BatchNorm2d output layouts {bn_layout}")
    if case.mode != "eager":
        from torch._dynamo.utils import counters

        f.require(counters["stats"]["unique_graphs"] >= 1, "nothing was compiled")
        ours = [r for r in counters["graph_break"] if "ghost" in r or "fxghost" in r]
        f.require(not ours, f"graph breaks in fxghost code: {ours}")
    f.notes["layout"] = fxghost.report(gm).rows()


class _CountCollectives:
    """Counts the collectives fxghost issues (it calls them through ``torch.distributed``)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce")

    def __enter__(self) -> _CountCollectives:
        self.count = 0
        self.saved = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counted(fn))
        return self

    def _counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _special(name: str, rank: int, groups: Groups, f: _Failures) -> None:
    group4 = groups.by_size[4]
    if name == "bfloat16":
        # bfloat16 channels_last input, float32 layer (mixed precision): statistics in float32,
        # output and input gradient rounded once, against the float64 reference. N=16
        # (3+5+2+6) -> 8 on ranks 0-1, 8 on ranks 1-3.
        sizes, g = (3, 5, 2, 6), 8
        model = _init_bn(nn.Sequential(nn.BatchNorm2d(3)), 0.1)
        ref = apply_chunked_ghost_batchnorm(copy.deepcopy(model).double(), g)
        gm = fxghost.transform(model, g, process_group=group4)
        every = (_batch("2d", 0, sum(sizes), 0) * 3).to(torch.bfloat16)
        every = every.to(memory_format=torch.channels_last)
        start, n = _offsets(sizes)[rank], sizes[rank]
        x = every[start : start + n].clone().requires_grad_()
        y = gm(x)
        # Loss weights that bfloat16 holds exactly, so that both get the same output gradient.
        (y * _loss_weights(start, y, 0).to(torch.bfloat16)).sum().backward()
        x64 = every.double().requires_grad_()
        y64 = ref(x64)
        (y64 * _loss_weights(0, y64, 0).to(torch.bfloat16).double()).sum().backward()
        f.require(y.is_contiguous(memory_format=torch.channels_last), "output not channels_last")
        f.check(assert_ulp_close, y, y64[start : start + n], "output")
        f.check(assert_ulp_close, x.grad, x64.grad[start : start + n], "input grad")
        for got, want in zip(model.buffers(), ref.buffers(), strict=True):
            if want.dtype == torch.long:
                f.require(torch.equal(got, want), f"num_batches_tracked {got} != {want}")
            else:
                f.check(assert_close, got.double(), want, "running stats", STATS32_TOL)
    elif name == "eval":
        # Plain BatchNorm eval on each process's own batch (any size), without communicating.
        model = _net("2d")
        gm = fxghost.transform(model, 4, process_group=group4).eval()
        x = _batch("2d", 0, rank + 1, 0)
        with _CountCollectives() as counted:
            y = gm(x)
        f.require(counted.count == 0, f"eval issued {counted.count} collectives")
        f.check(assert_close, y, _net("2d").eval()(x), "eval output")
    elif name == "eval_without_running_stats":
        # Batch statistics in eval too: ghost batches of the group's batch, N=5 < g one of them.
        sizes = (1, 2, 1, 1)
        model = _init_bn(nn.Sequential(nn.BatchNorm1d(6, track_running_stats=False)).double(), 0.1)
        gm = fxghost.transform(copy.deepcopy(model), 8, process_group=group4).eval()
        x = _batch("bn1d", _offsets(sizes)[rank], sizes[rank], 0)
        y = gm(x)
        ref = apply_chunked_ghost_batchnorm(model, 8).eval()(_batch("bn1d", 0, sum(sizes), 0))
        start = _offsets(sizes)[rank]
        f.check(assert_close, y, ref[start : start + sizes[rank]], "eval output")
        empty = gm(x[:0])  # every process's batch empty: an empty output, as BatchNorm gives
        f.require(empty.shape == (0, 6), f"empty eval batch gave {tuple(empty.shape)}")
    elif name in ("single_value_per_channel", "group_smaller_than_g"):
        # The same ValueError on every process, decided from the gathered sizes; nothing updated.
        sizes, g = ((2, 2, 2, 1), 2) if name == "single_value_per_channel" else ((1, 1, 1, 1), 8)
        model = _net("bn1d")
        before = _buffers(model)
        gm = fxghost.transform(model, g, process_group=group4)
        x = _batch("bn1d", _offsets(sizes)[rank], sizes[rank], 0)
        try:
            gm(x)
        except ValueError as err:
            f.notes["error"] = str(err)
        else:
            f.messages.append("no ValueError")
        # The same error from the compiled model, whole-graph: decided at run time, inside the
        # compiled code (dynamo once turned it into "Attempt to trace generator").
        compiled = torch.compile(gm, fullgraph=True, backend="eager")
        try:
            compiled(x)
        except Exception as err:
            f.notes["compiled_error"] = f"{type(err).__name__}: {err}"
        else:
            f.messages.append("no error when compiled")
        for k, b in _buffers(model).items():
            f.require(torch.equal(b, before[k]), f"{k} was updated")
    elif name == "double_backward":
        # create_graph=True through a grouped layer: an error naming the layer, on every process.
        gm = fxghost.transform(_net("bn1d"), 4, process_group=group4)
        x = _batch("bn1d", 0, 2, 0).requires_grad_()
        try:
            torch.autograd.grad(gm(x).pow(2).sum(), x, create_graph=True)
        except RuntimeError as err:
            f.notes["error"] = str(err)
        else:
            f.messages.append("no error")
    elif name == "functional_collective_input":
        # An un-waited functional collective's result fed straight to a BatchNorm without a
        # group: "auto" runs it through torch ops (which wait), where the C kernels would read
        # memory the tensor does not hold; a kernel backend asked for by name says so.
        from torch.distributed import _functional_collectives as funcol

        model = _init_bn(nn.Sequential(nn.BatchNorm2d(3)).float(), 0.1)
        ref = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
        x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(rank))
        summed = funcol.all_reduce(x, "sum", group4)
        f.notes["type"] = type(summed).__name__
        y = fxghost.transform(model, 4)(summed)
        f.check(assert_close, y, ref(funcol.all_reduce(x, "sum", group4).wait()), "output")
        try:
            if not cpu.available():
                raise ValueError("no C compiler: backend='cpu' not tried")
            fxghost.transform(copy.deepcopy(model), 4, backend="cpu")(
                funcol.all_reduce(x, "sum", group4)
            )
        except ValueError as err:
            f.notes["cpu_error"] = str(err)
        else:
            f.messages.append("backend='cpu' took the tensor subclass")
    elif name == "one_process_fails_input_check":
        # Rank 2 feeds a float32 batch to a float64 layer: InputDtypeError there, and a
        # ValueError naming it on the others instead of a wait until the timeout.
        model = _net("bn1d")
        gm = fxghost.transform(model, 4, process_group=group4)
        x = _batch("bn1d", 0, 3, 0)
        try:
            gm(x.float() if rank == 2 else x)
        except (TypeError, ValueError) as err:
            f.notes["error"] = f"{type(err).__name__}: {err}"
        else:
            f.messages.append("no error")
    elif name == "report":
        # Per layer: the group size, and the layout of the last batch.
        case = CASES["below_g_groups_of_2"]
        gm = fxghost.transform(_net("2d"), 4, process_group=groups.by_size[2])
        gm(_batch("2d", 0, case.sizes[rank], 0))
        f.notes["rows"] = fxghost.report(gm).rows()
        f.notes["table"] = fxghost.report(gm).table()
        try:
            fxghost.transform(_net("2d"), 4, process_group=groups.by_size[2], backend="torch")
        except ValueError as err:
            f.notes["backend_error"] = str(err)
    else:  # pragma: no cover
        raise ValueError(name)


def readme_section() -> str:
    """The documentation's page on process groups (once a section of the README)."""
    return (Path(__file__).resolve().parents[1] / "docs/process-groups.md").read_text()


def readme_block() -> str:
    """The training script of the page on process groups."""
    blocks = readme_section().split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if "init_process_group" in b)


def readme_command() -> list[str]:
    """The first command line that the page gives for running that script."""
    blocks = readme_section().split("```bash\n")[1:]
    commands = next(b.split("```")[0] for b in blocks if "train.py" in b)
    return commands.splitlines()[0].partition("#")[0].split()


def _record(name: str, rank: int, out_dir: str, fn: Callable[[_Failures], None]) -> None:
    f = _Failures()
    error = None
    start = time.perf_counter()
    try:
        fn(f)
    except Exception:
        error = traceback.format_exc()
    result = {
        "failures": f.messages,
        "error": error,
        "notes": f.notes,
        "seconds": time.perf_counter() - start,
    }
    Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(result, default=str))


def _worker(rank: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)  # four processes on a small CPU: no oversubscription
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        groups = Groups()
        for name in names:
            if name in CASES:
                scenario = functools.partial(_run_case, CASES[name], rank, groups)
            else:
                scenario = functools.partial(_special, name, rank, groups)
            _record(name, rank, out_dir, scenario)
            dist.barrier()  # realign the ranks before the next scenario's collectives
    finally:
        dist.destroy_process_group()


def run(names: list[str], tmp: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Run the scenarios ``names`` in four processes; each (scenario, rank)'s recorded result."""
    missing = {"failures": [], "error": "no result recorded", "notes": {}, "seconds": 0.0}
    args = (str(tmp / "init"), str(tmp), names)
    return run_ranks(_worker, args, WORLD, names, tmp, JOIN_TIMEOUT_S, missing)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    return run(list(SCENARIOS), tmp_path_factory.mktemp("process_group"))


def _assert_ok(results: dict[tuple[str, int], dict[str, Any]], name: str) -> None:
    problems = []
    for rank in range(WORLD):
        r = results[name, rank]
        if r["error"]:
            problems.append(f"rank {rank} raised:\n{r['error']}")
        problems.extend(f"rank {rank}: {m}" for m in r["failures"])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_chunked_reference_on_concatenated_batch(
    results: dict[tuple[str, int], dict[str, Any]], name: str
) -> None:
    """Outputs, input gradients, parameter gradients and buffers over the steps of each case."""
    _assert_ok(results, name)


def test_bfloat16_within_two_ulps_of_float64(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    _assert_ok(results, "bfloat16")


def test_eval_is_plain_batchnorm_without_communication(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    _assert_ok(results, "eval")


def test_eval_without_running_stats_ghosts_the_group_batch(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    _assert_ok(results, "eval_without_running_stats")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "single_value_per_channel",
            "N=7 (2+2+2+1 in the processes of its group) with ghost_batch_size=2 forms ghost "
            "batches of 3 of 2 and one of 1 sample(s), and one of them has a single value per "
            "channel",
        ),
        (
            "group_smaller_than_g",
            "got a training batch of N=4 samples (1+1+1+1 in the processes of its group), smaller "
            "than ghost_batch_size=8",
        ),
    ],
)
def test_same_error_on_every_process_nothing_updated(
    results: dict[tuple[str, int], dict[str, Any]], name: str, expected: str
) -> None:
    _assert_ok(results, name)
    messages = {results[name, rank]["notes"]["error"] for rank in range(WORLD)}
    assert len(messages) == 1, messages
    (message,) = messages
    assert "layer '0' (BatchNorm1d)" in message and expected in message, message


def test_errors_decided_at_run_time_surface_from_compiled_models(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    for rank in range(WORLD):
        got = results["group_smaller_than_g", rank]["notes"]["compiled_error"]
        assert got.startswith("ValueError: fxghost: layer '0' (BatchNorm1d) got a training"), got


def test_double_backward_error_names_the_layer(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    _assert_ok(results, "double_backward")
    for rank in range(WORLD):
        got = results["double_backward", rank]["notes"]["error"]
        assert got.startswith("fxghost: layer '0' (BatchNorm1d): double backward"), got
        assert "Transform without process_group" in got, got


def test_functional_collective_input_runs_on_torch_ops(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    _assert_ok(results, "functional_collective_input")
    notes = results["functional_collective_input", 0]["notes"]
    assert notes["type"] == "AsyncCollectiveTensor", notes
    if cpu.available():
        assert "cannot read AsyncCollectiveTensor, a tensor subclass" in notes["cpu_error"]


def test_a_process_failing_its_input_check_fails_the_group(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    _assert_ok(results, "one_process_fails_input_check")
    errors = [
        results["one_process_fails_input_check", rank]["notes"]["error"] for rank in range(WORLD)
    ]
    assert errors[2].startswith("InputDtypeError:"), errors[2]
    for rank in (0, 1, 3):
        assert "process(es) [2] of its process group" in errors[rank], errors[rank]


def test_report_gives_group_size_and_last_layout(
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    _assert_ok(results, "report")
    rows = results["report", 0]["notes"]["rows"]
    assert [(r["layer"], r["group"]) for r in rows] == [("1", 2), ("5", 2)]
    assert rows[0]["ghost batches (last batch)"] == "N=8 (3+5): 4 on ranks 0-1, 4 on rank 1"
    assert results["report", 3]["notes"]["rows"][0]["ghost batches (last batch)"] == (
        "N=4 (2+2): 4 on ranks 0-1"
    )
    assert rows[0]["backend (last call)"] == "torch (process group)"
    assert (
        "backend='torch' normalizes one process's batch"
        in (results["report", 0]["notes"]["backend_error"])
    )


def test_group_of_one_reports_its_size(results: dict[tuple[str, int], dict[str, Any]]) -> None:
    rows = results["group_of_one", 0]["notes"]["layout"]
    assert [r["group"] for r in rows] == [1, 1]
    assert all(r["backend (last call)"] != "torch (process group)" for r in rows)


def test_readme_recipe_runs_as_written(tmp_path: Path) -> None:
    """The documented train.py, run by its first command line: two processes on CPU, one group of
    two holding one ghost batch of 16 (8 + 8) per step."""
    command = readme_command()
    assert command == ["torchrun", "--standalone", "--nproc_per_node=2", "train.py"]
    (tmp_path / "train.py").write_text(readme_block())
    # On CPU whatever the machine has: the command names two processes, and a machine with one
    # GPU would give the second a device it does not have.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [*torchrun(), *command[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOIN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r.split() for r in proc.stdout.splitlines() if r.split()[:2] == ["1", "BatchNorm2d"]]
    assert len(rows) == 1, proc.stdout  # printed by rank 0 only
    (row,) = rows
    # The recipe's layer ends in a ReLU, which the pass fuses (the epilogue column).
    assert row[1:2] + row[6:] == [
        "BatchNorm2d",
        "relu",
        "torch",
        "(process",
        "group)",
        "2",
        "N=16",
        "(8+8):",
        "16",
        "on",
        "ranks",
        "0-1",
    ], proc.stdout
    assert "1 layer(s) rewritten with ghost_batch_size=16, 0 skipped" in proc.stdout


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="process_group must be a torch.distributed.ProcessGroup"):
        fxghost.transform(nn.Sequential(nn.BatchNorm1d(3)), 4, process_group="world")


if os.name != "posix":  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="file:// rendezvous and spawn tested on POSIX only")


if __name__ == "__main__":  # a subset by name: python tests/test_process_group.py NAME...
    import sys
    import tempfile

    chosen = sys.argv[1:] or list(SCENARIOS)
    with tempfile.TemporaryDirectory() as d:
        got = run(chosen, Path(d))
    for (name, rank), r in sorted(got.items()):
        status = "ok" if not (r["error"] or r["failures"]) else "FAIL"
        print(f"{name} rank {rank}: {status} {r['seconds']:.1f}s")
        if r["error"]:
            print(r["error"])
        for m in r["failures"][:5]:
            print("   ", m)
