#!/usr/bin/env python
"""Ghost batches across processes (``transform(..., process_group=pg)``): what a BatchNorm layer
sends per training step, against SyncBatchNorm and against gathering activations, and what a
layer step costs on this machine.

    python benchmarks/process_group.py                      # bytes tables, then CPU/gloo timing
    python benchmarks/process_group.py --no-time            # bytes only (no processes started)
    python benchmarks/process_group.py --procs 2 4 --shape 64,28,28 --ghost 32 --repeats 40

**Bytes** are per process, per layer and per training step (forward and backward), for a group of
``k`` processes with ``n`` samples each: the values each process puts into collectives
("payload"), and what leaves it on the wire with ring algorithms (an all-gather of ``m`` bytes
per process sends ``(k-1) m``; an all-reduce of ``m`` bytes ``2 (k-1) / k * m``; a reduce-scatter
of ``M`` bytes ``(k-1) / k * M``), float32 statistics and activations:

- fxghost: all-gather of the batch sizes (3 int64), all-gather of each process's pieces of ghost
  batches (mean and squared deviations, ``pieces x 2 x C``), all-reduce of the per-ghost-batch
  sums of ``dy`` and ``dy * xhat`` (``ghost batches x 2 x C``). Counted from fxghost's own layout
  code, and checked against the collectives a real step issues when processes run.
- SyncBatchNorm (its code in torch/nn/modules/_functions.py): all-gather of mean, invstd and
  count (``2C + 1``), all-reduce of ``sum_dy`` and ``sum_dy_xmu`` (``2C``). On CUDA only, so it
  is counted, not timed, here.
- gathering activations (``all_gather_single_autograd`` of torch's functional collectives, then
  ghost BatchNorm on the concatenated batch): all-gather of the activation (``n x C x
  spatial``); its backward reduce-scatters the gradient of the whole concatenated batch.

**Time**: median milliseconds of one layer step (forward, then backward of a weighted sum), each
of ``k`` processes (gloo, CPU, one thread each) holding ``g / k`` samples, so that the group holds
one ghost batch: fxghost with the group; gathering activations; and, for scale, fxghost on each
process's own batch (ghost size ``g / k``, no communication) and plain BatchNorm per process.
Each repeat starts and ends at a barrier and rank 0 times it, so a step is as slow as the slowest
process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxghost  # noqa: E402
from fxghost import _distributed  # noqa: E402

F32, I64 = 4, 8
#: (k processes, n samples each): the group holding one ghost batch of g=32, then larger batches.
LAYOUTS = ((2, 16), (4, 8), (8, 4), (16, 2), (4, 64), (8, 64))


def _ring(
    all_gather: float = 0, all_reduce: float = 0, reduce_scatter: float = 0, k: int = 2
) -> float:
    return (k - 1) * all_gather + 2 * (k - 1) / k * all_reduce + (k - 1) / k * reduce_scatter


def layer_bytes(
    k: int, n: int, channels: int, spatial: int, g: int
) -> dict[str, tuple[float, float]]:
    """``{approach: (payload, ring wire bytes)}`` per process for one layer step."""
    layout = _distributed.group_split((n,) * k, g)
    pieces = max(len(lengths) for _, lengths in layout.pieces)
    header, stats, grads = 3 * I64, pieces * 2 * channels * F32, layout.ghosts * 2 * channels * F32
    activation = n * channels * spatial * F32
    sync_gather, sync_reduce = (2 * channels + 1) * F32, 2 * channels * F32
    return {
        "fxghost (process_group)": (
            header + stats + grads,
            _ring(all_gather=header + stats, all_reduce=grads, k=k),
        ),
        "SyncBatchNorm": (
            sync_gather + sync_reduce,
            _ring(all_gather=sync_gather, all_reduce=sync_reduce, k=k),
        ),
        "gather activations": (
            activation + k * activation,
            _ring(all_gather=activation, reduce_scatter=k * activation, k=k),
        ),
    }


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def bytes_tables(g: int, channels: int, spatial: tuple[int, ...]) -> str:
    per_sample = 1
    for d in spatial:
        per_sample *= d
    lines = [
        f"One layer, C={channels}, "
        f"{'spatial ' + 'x'.join(map(str, spatial)) if spatial else 'no spatial dims'}, g={g}, "
        "float32; "
        "per process per step: payload / on the wire (ring)",
        "",
        "| k | n per process | ghost batches | fxghost (process_group) | SyncBatchNorm | "
        "gather activations |",
        "|---|---|---|---|---|---|",
    ]
    for k, n in LAYOUTS:
        row = layer_bytes(k, n, channels, per_sample, g)
        ghosts = _distributed.group_split((n,) * k, g).ghosts
        cells = [f"{_size(p)} / {_size(w)}" for p, w in row.values()]
        lines.append(f"| {k} | {n} | {ghosts} | " + " | ".join(cells) + " |")
    lines += ["", resnet50_table(g)]
    return "\n".join(lines)


def resnet50_table(g: int) -> str:
    """Whole ResNet-50 (224 px, 53 BatchNorm layers): bytes per process per training step."""
    import torchvision

    model = torchvision.models.resnet50()
    shapes: list[tuple[int, int]] = []  # (channels, spatial) of each BatchNorm's input
    hooks = [
        m.register_forward_hook(lambda m, a, o: shapes.append((a[0].shape[1], a[0][0, 0].numel())))
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    lines = [
        f"ResNet-50, 224 px, {len(shapes)} BatchNorm layers, g={g}: per process per step, "
        "payload / on the wire (ring)",
        "",
        "| k | n per process | fxghost (process_group) | SyncBatchNorm | gather activations |",
        "|---|---|---|---|---|",
    ]
    for k, n in LAYOUTS:
        totals: dict[str, list[float]] = {}
        for channels, spatial in shapes:
            for name, (p, w) in layer_bytes(k, n, channels, spatial, g).items():
                t = totals.setdefault(name, [0.0, 0.0])
                t[0] += p
                t[1] += w
        cells = [f"{_size(p)} / {_size(w)}" for p, w in totals.values()]
        lines.append(f"| {k} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _Counted:
    """Sums the bytes this process passes into torch.distributed's collectives."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather")

    def __enter__(self) -> _Counted:
        self.payload = 0
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(fn))
        return self

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            tensor = args[1] if fn.__name__ != "all_reduce" else args[0]
            self.payload += tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)

        return counted

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _gather_activations(bn: nn.Module, x: torch.Tensor, rank: int) -> torch.Tensor:
    """The alternative: gather the group's activations (every process's batch has the same
    size here), ghost-normalize the whole batch, keep this process's slice."""
    from torch.distributed import _functional_collectives as fc

    # Waited for explicitly: kernels that read the data pointer do not wait for it.
    gather = getattr(fc, "all_gather_single_autograd", fc.all_gather_tensor_autograd)
    y = bn(fc.wait_tensor(gather(x, 0, dist.group.WORLD)))
    return y[rank * x.shape[0] : (rank + 1) * x.shape[0]]


def _worker(rank: int, k: int, init: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init}",
        rank=rank,
        world_size=k,
        timeout=timedelta(seconds=120),
    )
    try:
        g = args.ghost
        n = g // k
        channels, *spatial = args.shape
        torch.manual_seed(rank)
        x = torch.randn(n, channels, *spatial).requires_grad_()
        w = torch.randn_like(x)

        def bn() -> nn.Module:
            return nn.Sequential(nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels))

        grouped = fxghost.transform(bn(), g, process_group=dist.group.WORLD)
        local = fxghost.transform(bn(), n)
        plain = bn()
        whole = fxghost.transform(bn(), g)
        steps: dict[str, Callable[[], torch.Tensor]] = {
            "fxghost (process_group)": lambda: grouped(x),
            "gather activations": lambda: _gather_activations(whole, x, rank),
            "fxghost per process (g = n, no communication)": lambda: local(x),
            "plain BatchNorm per process": lambda: plain(x),
        }
        with _Counted() as counted:
            (grouped(x) * w).sum().backward()
        measured = [0] * k
        dist.all_gather_object(measured, counted.payload)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for i in range(args.warmup + args.repeats):
            for name, step in steps.items():  # interleaved, round by round
                dist.barrier()
                start = time.perf_counter()
                (step() * w).sum().backward()
                dist.barrier()
                if i >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1e3)
                x.grad = None
        if rank == 0:
            out[k] = {
                "measured payload": measured,
                "median ms": {name: statistics.median(t) for name, t in times.items()},
            }
    finally:
        dist.destroy_process_group()


def timing(args: argparse.Namespace) -> str:
    channels, *spatial = args.shape
    per_sample = 1
    for d in spatial:
        per_sample *= d
    lines = [
        f"One layer step, input (g/k, {', '.join(map(str, args.shape))}) float32 per process, "
        f"g={args.ghost}: median ms over {args.repeats} steps (gloo, CPU, one thread per "
        "process), and fxghost's bytes per process checked against the collectives it issued",
        "",
    ]
    rows: list[str] = []
    header: list[str] = []
    with mp.Manager() as manager:
        for k in args.procs:
            out = manager.dict()
            with tempfile.TemporaryDirectory() as tmp:
                mp.start_processes(
                    _worker,
                    args=(k, os.path.join(tmp, "init"), args, out),
                    nprocs=k,
                    start_method="spawn",
                )
            result = out[k]
            expected = layer_bytes(k, args.ghost // k, channels, per_sample, args.ghost)
            counted = set(result["measured payload"])
            check = (
                "yes"
                if counted == {expected["fxghost (process_group)"][0]}
                else (f"no: {sorted(counted)}")
            )
            header = list(result["median ms"])
            cells = [f"{v:.3g}" for v in result["median ms"].values()]
            rows.append(f"| {k} | {args.ghost // k} | " + " | ".join(cells) + f" | {check} |")
    lines.append("| k | n per process | " + " | ".join(header) + " | bytes as counted |")
    lines.append("|---|---|" + "---|" * len(header) + "---|")
    return "\n".join(lines + rows)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    parser.add_argument(
        "--shape", default="64,28,28", help="C,spatial... of one sample (default 64,28,28)"
    )
    parser.add_argument("--ghost", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-time", action="store_true", help="the bytes tables only")
    args = parser.parse_args(argv)
    args.shape = [int(s) for s in args.shape.split(",")]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{when}, torch {torch.__version__}, {_cpu()}, {os.cpu_count()} CPUs")
    print()
    print(bytes_tables(args.ghost, args.shape[0], tuple(args.shape[1:])))
    if not args.no_time:
        print()
        print(timing(args))


if __name__ == "__main__":
    main()
