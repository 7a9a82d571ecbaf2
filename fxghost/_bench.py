"""Benchmark suite: plain BatchNorm, the chunked reference and fxghost, side by side in one run.

Run it as ``python -m fxghost bench`` or ``python benchmarks/run.py`` (``--help`` lists the
options). Two sections, each measured in eager mode and under ``torch.compile``:

- ``layer``: one BatchNorm layer, forward + backward in training mode.
- ``model``: a whole training step (forward, loss, backward, SGD step) of a small network.

Every case builds the three implementations from one BatchNorm (or one model) with the same
initial weights, then times them back to back, interleaved round by round, so that the drift of a
noisy machine hits all three alike. Results are printed as one table per section on stdout and
saved as JSON; progress goes to stderr.

Ratios are speeds: ``vs plain`` is ``plain time / implementation time`` measured in the same mode
(above 1 is faster than plain BatchNorm), ``vs chunked`` likewise against the chunked reference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IMPLS", "LayerCase", "ModelCase", "Result", "main"]

IMPLS: tuple[str, ...] = ("plain", "chunked", "fxghost")
SECTIONS: tuple[str, ...] = ("layer", "model")
MODES: tuple[str, ...] = ("eager", "compiled")

Step = Callable[[], None]
# Builds the step of an implementation, eager or compiled: build(impl, compiled) -> step.
_Builder = Callable[[str, bool], Step]


# --------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class LayerCase:
    """One BatchNorm layer: input ``shape`` (N, C, ...) at each size in ``ghost_sizes``."""

    shape: tuple[int, ...]
    ghost_sizes: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compile: bool = True  # also measured under torch.compile (compiles are slow on CPU)

    @property
    def dtype_label(self) -> str:
        """Short dtype and layout label, such as ``"bf16 cl"``."""
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            self.dtype, str(self.dtype).removeprefix("torch.")
        )
        return f"{name} cl" if self.channels_last else name


@dataclass(frozen=True)
class ModelCase:
    """One training step of model ``name`` (``resnet18``, ``resnet50`` or ``mlp``)."""

    name: str
    batch: int
    ghost_sizes: tuple[int, ...]
    image_size: int = 224  # resnets only
    mlp_widths: tuple[int, ...] = (256, 512, 512, 10)  # mlp only: in, hidden..., classes
    autocast_bf16: bool = False
    channels_last: bool = False
    compile: bool = True

    @property
    def label(self) -> str:
        """Human-readable description of the model and its input."""
        if self.name == "mlp":
            return "mlp " + "-".join(str(w) for w in self.mlp_widths)
        extra = " bf16 cl" if self.autocast_bf16 and self.channels_last else ""
        return f"{self.name} {self.image_size}px{extra}"


def layer_cases(device: str, quick: bool) -> list[LayerCase]:
    """The layer shapes for ``device`` (those of ANCHORS.md), or tiny ones with ``quick``."""
    if quick:
        # Only the 2-D case is compiled: it is the cheapest to compile.
        return [
            LayerCase((32, 8, 6, 6), (8,), compile=False),
            LayerCase((256, 32), (32,)),
        ]
    if device == "cuda":
        bf16 = torch.bfloat16
        return [
            LayerCase((256, 256, 56, 56), (32, 16), bf16, channels_last=True),
            LayerCase((512, 512, 28, 28), (32,), bf16, channels_last=True),
            LayerCase((256, 2048, 7, 7), (32,), bf16, channels_last=True),
            LayerCase((256, 256, 56, 56), (32,)),
            LayerCase((16384, 512), (128, 256)),
        ]
    # On 2 CPU cores each compile takes 20-30 s: compile only the main ghost size of each shape.
    return [
        LayerCase((256, 64, 16, 16), (32,)),
        LayerCase((256, 64, 16, 16), (16,), compile=False),
        LayerCase((256, 64, 16, 16), (32,), channels_last=True, compile=False),
        LayerCase((4096, 256), (128,)),
        LayerCase((4096, 256), (32,), compile=False),
    ]


def model_cases(device: str, quick: bool) -> list[ModelCase]:
    """The whole-model cases for ``device``, or tiny ones with ``quick``."""
    if quick:
        return [
            ModelCase("resnet18", 4, (2,), image_size=16, compile=False),
            ModelCase("mlp", 128, (32,), mlp_widths=(32, 64, 64, 10), compile=False),
        ]
    if device == "cuda":
        return [
            ModelCase(
                "resnet50", 256, (32,), image_size=224, autocast_bf16=True, channels_last=True
            ),
        ]
    # Compiling ResNet-18 with chunked BN takes minutes on 2 cores: only the MLP is compiled.
    # Batch 32 (a step takes over a second on 2 cores) in ghost batches of 8: 4 per layer.
    return [
        ModelCase("resnet18", 32, (8,), image_size=64, compile=False),
        ModelCase("mlp", 1024, (32,), mlp_widths=(256, 512, 512, 10)),
    ]


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    """The raw numbers of one implementation in one case and mode."""

    section: str
    mode: str
    impl: str
    case: str
    ghost_batch_size: int
    params: dict[str, Any] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)
    page_faults: list[int] = field(default_factory=list)  # CPU: per timed step, as times_ms
    median_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    first_call_s: float | None = None  # the first call, compilation included in compiled mode
    step_mem_mib: float | None = None  # peak memory of one step above what was live before it
    mem_kind: str = "n/a"
    graph_breaks: int | None = None
    graph_break_reasons: list[str] = field(default_factory=list)
    graphs: int | None = None
    items_per_s: float | None = None  # models: samples per second at the median
    speed_vs_plain: float | None = None
    speed_vs_chunked: float | None = None
    error: str | None = None


def _set_ratios(results: Sequence[Result]) -> None:
    """Fill the speed ratios of results that share a section, mode, case and ghost size."""
    groups: dict[tuple[str, str, str, int], dict[str, Result]] = {}
    for r in results:
        groups.setdefault((r.section, r.mode, r.case, r.ghost_batch_size), {})[r.impl] = r
    for group in groups.values():
        for r in group.values():
            for base, attr in (("plain", "speed_vs_plain"), ("chunked", "speed_vs_chunked")):
                ref = group.get(base)
                if r.median_ms and ref is not None and ref.median_ms:
                    setattr(r, attr, ref.median_ms / r.median_ms)


# --------------------------------------------------------------------------------------------
# Timing and memory


def _page_faults() -> int | None:
    """Page faults of this process so far (all threads), where ``getrusage`` reports them.

    On CPU a step's time depends on whether its tensors' memory is fresh from the OS: each fresh
    4 KB page faults on first touch (measured 1.5-3.6 us each on the project's VM, so 1024 of them,
    one 4 MB activation, can cost more than a layer's kernels). Recorded with the times, it tells
    an implementation's slow steps from the allocator's."""
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


class _Clock:
    """Times steps: CUDA events on GPU (so host and device overlap as in training), wall-clock on
    CPU. ``pending`` collects events until ``collect`` synchronizes once per round."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []

    def sync(self) -> None:
        """Wait for the device."""
        if self.cuda:
            torch.cuda.synchronize()

    def time(
        self,
        key: str,
        step: Step,
        out: dict[str, list[float]],
        faults: dict[str, list[int]] | None = None,
    ) -> None:
        """Run ``step`` once and file its time (ms) under ``key`` (after ``collect`` on GPU), and
        on CPU the page faults it took under ``key`` in ``faults``."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            self._pending.append((key, start, end))
        else:
            f0 = _page_faults()
            t0 = time.perf_counter()
            step()
            out.setdefault(key, []).append((time.perf_counter() - t0) * 1e3)
            f1 = _page_faults()
            if faults is not None and f0 is not None and f1 is not None:
                faults.setdefault(key, []).append(f1 - f0)

    def collect(self, out: dict[str, list[float]]) -> None:
        """Synchronize and file the pending CUDA event times."""
        if self._pending:
            torch.cuda.synchronize()
            for key, start, end in self._pending:
                out.setdefault(key, []).append(start.elapsed_time(end))
            self._pending.clear()

    def wall(self, step: Step) -> float:
        """Seconds ``step`` takes, device work included."""
        self.sync()
        t0 = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - t0


class _CpuPeakMemory:
    """Peak resident memory of one call above the resident memory before it, on Linux.

    The kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, and freed heap
    memory is handed back with malloc_trim first: otherwise glibc reuses memory the warm-up freed
    and the step shows no growth at all. Approximate (page granularity, allocator slack)."""

    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None = None
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        self.available = self._trim is not None and self._reset_hwm() and self._kib("VmHWM") > 0

    @staticmethod
    def _kib(key: str) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    def measure(self, step: Step) -> float | None:
        """MiB of resident memory ``step`` adds at its peak, or None where unsupported."""
        if not self.available or self._trim is None:
            return None
        gc.collect()
        self._trim(0)
        self._reset_hwm()
        before = self._kib("VmRSS")
        step()
        return max(self._kib("VmHWM") - before, 0) / 1024


def _cuda_step_memory(step: Step) -> float:
    """MiB that ``step`` allocates on the GPU at its peak above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _dynamo_snapshot() -> tuple[dict[str, int], int]:
    """Dynamo's running counts of graph breaks (by reason) and of graphs compiled; they are not
    cleared by ``torch._dynamo.reset``, so callers take differences."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"]), int(counters["stats"]["unique_graphs"])


def _quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentiles."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[0], q[2]


# --------------------------------------------------------------------------------------------
# Building the implementations


def _apply_impl(impl: str, module: nn.Module, g: int) -> nn.Module:
    """``module`` (already a private copy) with its BatchNorm layers as ``impl`` computes them."""
    if impl == "plain":
        return module
    if impl == "chunked":
        from .reference import apply_chunked_ghost_batchnorm

        return apply_chunked_ghost_batchnorm(module, g)
    if impl == "fxghost":
        from . import transform

        return transform(module, ghost_batch_size=g)
    raise ValueError(f"unknown implementation {impl!r}")


def _compile(module: nn.Module) -> nn.Module:
    # dynamic=False: shapes are fixed per case, and a recompile must not turn them symbolic.
    return torch.compile(module, dynamic=False)  # type: ignore[return-value]


def _make_bn(case: LayerCase, device: torch.device) -> nn.Module:
    """A BatchNorm for ``case`` with non-trivial affine parameters and running statistics (fp32
    parameters, as a network under bf16 autocast has them)."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[
        len(case.shape)
    ]
    channels = case.shape[1]
    bn = cls(channels)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        values = {
            "weight": 1 + 0.1 * torch.randn(channels, generator=gen),
            "bias": 0.1 * torch.randn(channels, generator=gen),
            "running_mean": 0.1 * torch.randn(channels, generator=gen),
            "running_var": 1 + 0.1 * torch.rand(channels, generator=gen),
        }
        for name, t in [*bn.named_parameters(), *bn.named_buffers()]:
            if name in values:
                t.copy_(values[name])
    return bn.to(device)


def _layer_steps(case: LayerCase, g: int, device: torch.device) -> tuple[_Builder, dict[str, Any]]:
    """The step builder of one layer case, and the parameters to record."""
    # Drawn on the device: hundreds of MB on the GPU cases, slow to draw on the host.
    gen = torch.Generator(device=device).manual_seed(1)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format

    def draw() -> Tensor:
        t = torch.randn(case.shape, generator=gen, device=device)
        return t.to(case.dtype, memory_format=fmt)

    x, dy = draw(), draw()
    x.requires_grad_(True)  # dx is computed, as in a network
    base = _make_bn(case, device)

    def build(impl: str, compiled: bool) -> Step:
        # Wrapped in a Sequential so that all three run the same container code.
        module = _apply_impl(impl, nn.Sequential(copy.deepcopy(base)), g)
        module.train()
        params = list(module.parameters())
        run = _compile(module) if compiled else module

        def step() -> None:
            run(x).backward(dy)
            # Cleared after the step, so that no gradient lives between steps.
            x.grad = None
            for p in params:
                p.grad = None

        return step

    params = {"shape": list(case.shape), "dtype": case.dtype_label}
    return build, params


def _build_model(case: ModelCase) -> nn.Module:
    if case.name == "mlp":
        layers: list[nn.Module] = []
        widths = case.mlp_widths
        for w_in, w_out in zip(widths[:-2], widths[1:-1], strict=True):
            layers += [nn.Linear(w_in, w_out), nn.BatchNorm1d(w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        return nn.Sequential(*layers)
    import torchvision

    factory = getattr(torchvision.models, case.name)
    return factory(weights=None)  # never downloads: random init


def _model_steps(case: ModelCase, g: int, device: torch.device) -> tuple[_Builder, dict[str, Any]]:
    """The step builder of one model case, and the parameters to record."""
    torch.manual_seed(0)
    base = _build_model(case).to(device)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    if case.channels_last:
        base = base.to(memory_format=fmt)  # type: ignore[call-overload]
    gen = torch.Generator(device="cpu").manual_seed(1)
    if case.name == "mlp":
        x = torch.randn(case.batch, case.mlp_widths[0], generator=gen).to(device)
        classes = case.mlp_widths[-1]
    else:
        size = (case.batch, 3, case.image_size, case.image_size)
        x = torch.randn(size, generator=gen).to(device, memory_format=fmt)
        classes = 1000
    target = torch.randint(0, classes, (case.batch,), generator=gen).to(device)
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    if case.autocast_bf16:

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return torch.autocast(device.type, dtype=torch.bfloat16)

    else:
        autocast = contextlib.nullcontext

    def build(impl: str, compiled: bool) -> Step:
        model = copy.deepcopy(base)
        model.train()
        # fxghost's GraphModule shares the parameters of `model`; the chunked wrapper keeps them.
        net = _apply_impl(impl, model, g)
        # A small learning rate: random labels must not drive the weights to inf/NaN.
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-5)
        run = _compile(net) if compiled else net

        def step() -> None:
            with autocast():
                loss = F.cross_entropy(run(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    params = {
        "model": case.name,
        "batch": case.batch,
        "input": list(x.shape),
        "autocast": "bf16" if case.autocast_bf16 else None,
        "channels_last": case.channels_last,
    }
    return build, params


# --------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class _Timing:
    """``warmup`` untimed rounds, then rounds until ``repeats`` steps per implementation are timed.
    In a round each implementation runs ``block`` steps in a row; with ``block > 1`` the first of
    them is not timed, so that timed steps follow a step of the same implementation."""

    warmup: int
    repeats: int
    block: int = 1

    @property
    def timed_per_block(self) -> int:
        return max(1, self.block - 1)

    @property
    def rounds(self) -> int:
        return -(-self.repeats // self.timed_per_block)


@dataclass
class _Job:
    """One case at one ghost size in one mode: all implementations, timed together."""

    section: str
    mode: str
    case: str
    g: int
    make: Callable[[], tuple[_Builder, dict[str, Any]]]
    timing: _Timing
    batch: int | None = None  # models: samples per step

    @property
    def title(self) -> str:
        return f"{self.section} {self.mode} {self.case} g={self.g}"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _compile_scope(enabled: bool) -> Iterator[None]:
    """Fresh dynamo state for a compiled job, reset again afterwards."""
    if not enabled:
        yield
        return
    import torch._dynamo

    torch._dynamo.reset()
    cfg = torch._dynamo.config
    # The implementations of a job may share a forward's code object (nn.Sequential): each is a
    # cache entry of its own, so allow more than the default 8.
    limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    try:
        with cfg.patch({limit_name: 64}):
            yield
    finally:
        torch._dynamo.reset()


def _cold_cache(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """With ``enabled``, an empty Inductor cache (on disk and in memory) for one compilation, so
    that its time depends neither on earlier runs nor on the implementation compiled before it.
    Code already compiled keeps working once the cache is gone."""
    if not enabled:
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache()


def _warm_compiler(device: torch.device, cold: bool) -> float:
    """Compile and run a tiny training step once, so that the one-time costs of the process
    (imports, toolchain checks) are not charged to the first implementation compiled."""
    import torch._dynamo

    t0 = time.perf_counter()
    with _cold_cache(cold):
        lin = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).to(device)
        torch.compile(lin, dynamic=False)(torch.randn(16, 8, device=device)).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    torch._dynamo.reset()
    return time.perf_counter() - t0


def _round_orders(impls: list[str]) -> list[list[str]]:
    """The implementations' orders in consecutive rounds, taken in turn.

    On CPU what one implementation leaves behind slows the next one's steps, and not only the
    first: after chunked's many chunk-sized tensors, a 4 MB layer step took 1.27x, 1.16x and
    1.10x its settled time over its next three steps (no page faults; the heap's layout, and so
    which addresses are cache-warm, takes steps to settle). So each implementation must follow
    each other one equally often. Rotating ``abc, bca, cab`` does not do that (``a`` follows
    ``c`` in two rounds of three); ``abc, acb`` does: the cycle ``abcacb`` holds every ordered
    pair once. Found by a depth-first search, instant for the suite's three implementations.
    """
    n = len(impls)
    if n <= 2:
        return [impls]
    seq: list[int] = []
    used: set[tuple[int, int]] = set()

    def extend() -> bool:
        if len(seq) == n * (n - 1):  # n - 1 rounds; the cycle closes back to the first
            return seq[-1] != seq[0] and (seq[-1], seq[0]) not in used
        in_round = seq[len(seq) - len(seq) % n :]
        for i in range(n):
            pair = (seq[-1], i) if seq else None
            if i in in_round or (pair and (pair[0] == i or pair in used)):
                continue
            seq.append(i)
            used.update([pair] if pair else [])
            if extend():
                return True
            seq.pop()
            used.difference_update([pair] if pair else [])
        return False

    if not extend():  # none exists: rotate
        return [impls[r:] + impls[:r] for r in range(n)]
    return [[impls[i] for i in seq[r : r + n]] for r in range(0, len(seq), n)]


def _run_job(
    job: _Job,
    impls: Sequence[str],
    device: torch.device,
    cold_compile: bool,
    cpu_mem: _CpuPeakMemory,
) -> list[Result]:
    """Build, warm up and time every implementation of ``job``, interleaved."""
    compiled = job.mode == "compiled"
    clock = _Clock(device)
    results = {impl: Result(job.section, job.mode, impl, job.case, job.g) for impl in impls}
    steps: dict[str, Step] = {}
    with _compile_scope(compiled):
        try:
            build, params = job.make()
        except Exception as exc:  # a broken case must not stop the suite
            for r in results.values():
                r.error = f"setup: {type(exc).__name__}: {exc}"
            return list(results.values())
        for impl in impls:
            r = results[impl]
            r.params = dict(params)
            try:
                breaks0, graphs0 = _dynamo_snapshot()
                with _cold_cache(compiled and cold_compile):
                    step = build(impl, compiled)
                    r.first_call_s = clock.wall(step)
                if compiled:
                    breaks1, graphs1 = _dynamo_snapshot()
                    new = {k: n - breaks0.get(k, 0) for k, n in breaks1.items()}
                    r.graph_breaks, r.graphs = sum(new.values()), graphs1 - graphs0
                    r.graph_break_reasons = [str(k)[:300] for k, n in new.items() if n > 0]
                    _progress(
                        f"      {impl}: first call (compile) {r.first_call_s:.1f} s, "
                        f"{r.graphs} graph(s), {r.graph_breaks} graph break(s)"
                    )
                steps[impl] = step
            except Exception as exc:
                r.error = f"{type(exc).__name__}: {exc}"
                _progress(f"      {impl}: FAILED {r.error[:300]}")
        times: dict[str, list[float]] = {}
        faults: dict[str, list[int]] = {}
        orders = _round_orders(list(steps))
        timing = job.timing
        # Rounds interleave the implementations, so that a slow spell of a shared machine hits
        # them all. Within a round each runs a block of steps whose first is untimed: on CPU a
        # step right after another implementation's pays for that one's allocation pattern
        # (glibc hands memory back to the OS, and the next step page-faults it in again), which
        # a training loop running one implementation never sees.
        for rnd in range(timing.warmup + timing.rounds):
            sink: dict[str, list[float]] = {} if rnd < timing.warmup else times
            fault_sink: dict[str, list[int]] = {} if rnd < timing.warmup else faults
            for impl in orders[rnd % len(orders)]:
                for i in range(timing.block):
                    if impl not in steps:
                        break
                    try:
                        if timing.block > 1 and i == 0:
                            steps[impl]()
                        else:
                            clock.time(impl, steps[impl], sink, fault_sink)
                    except Exception as exc:
                        results[impl].error = f"{type(exc).__name__}: {exc}"
                        del steps[impl]
            clock.collect(sink)
        for ts in times.values():
            del ts[timing.repeats :]
        for fs in faults.values():
            del fs[timing.repeats :]
        for impl in list(steps):
            r = results[impl]
            try:
                if device.type == "cuda":
                    r.step_mem_mib, r.mem_kind = _cuda_step_memory(steps[impl]), "cuda allocated"
                else:
                    r.step_mem_mib = cpu_mem.measure(steps[impl])
                    r.mem_kind = "rss" if r.step_mem_mib is not None else "n/a"
            except Exception as exc:
                r.error = f"{type(exc).__name__}: {exc}"
                continue
            ts = times.get(impl, [])
            if ts:
                r.times_ms = ts
                r.page_faults = faults.get(impl, [])
                r.median_ms, r.p25_ms, r.p75_ms = _quantiles(ts)
                if job.batch is not None:
                    r.items_per_s = job.batch / (r.median_ms / 1e3)
        steps.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(results.values())


def _jobs(
    sections: Sequence[str],
    modes: Sequence[str],
    device: str,
    quick: bool,
    ghost_sizes: Sequence[int] | None,
    layer_timing: _Timing,
    model_timing: _Timing,
    cases: Sequence[str] | None = None,
) -> list[_Job]:
    """All jobs in run order: by section, then mode, then case. With ``ghost_sizes`` given, cases
    that differ only in their own ghost sizes (one shape listed once per size) run once per size.
    With ``cases`` given, only cases whose label contains one of those strings run."""
    torch_device = torch.device(device)
    jobs: list[_Job] = []
    seen: set[tuple[str, str, str, int]] = set()

    def add(job: _Job) -> None:
        key = (job.section, job.mode, job.case, job.g)
        if cases and not any(c in job.case for c in cases):
            return
        if key not in seen:
            seen.add(key)
            jobs.append(job)

    for section in sections:
        for mode in modes:
            if section == "layer":
                for lc in layer_cases(device, quick):
                    if mode == "compiled" and not lc.compile:
                        continue
                    for g in ghost_sizes or lc.ghost_sizes:
                        label = "(" + ",".join(map(str, lc.shape)) + ") " + lc.dtype_label
                        add(
                            _Job(
                                section,
                                mode,
                                label,
                                g,
                                _bind(_layer_steps, lc, g, torch_device),
                                layer_timing,
                            )
                        )
            else:
                for mc in model_cases(device, quick):
                    if mode == "compiled" and not mc.compile:
                        continue
                    for g in ghost_sizes or mc.ghost_sizes:
                        add(
                            _Job(
                                section,
                                mode,
                                f"{mc.label} batch {mc.batch}",
                                g,
                                _bind(_model_steps, mc, g, torch_device),
                                model_timing,
                                batch=mc.batch,
                            )
                        )
    return jobs


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    # A named binder (rather than a lambda in a loop) so that each job keeps its own arguments.
    return lambda: fn(*args)


# --------------------------------------------------------------------------------------------
# Output


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _table(section: str, results: Sequence[Result]) -> str:
    from tabulate import tabulate

    rows = []
    # Page faults are counted on CPU; CUDA results have none.
    cpu = any(r.page_faults for r in results if r.section == section)
    for r in results:
        if r.section != section:
            continue
        spread = (
            100 * (r.p75_ms - r.p25_ms) / r.median_ms
            if r.median_ms and r.p25_ms is not None and r.p75_ms is not None
            else None
        )
        row: list[Any] = [r.mode, r.case, r.ghost_batch_size, r.impl]
        if r.error:
            rows.append(row + ["error: " + r.error[:60]])
            continue
        ms_digits = 3 if r.median_ms is not None and r.median_ms < 1 else 2
        row += [_fmt(r.median_ms, ms_digits), _fmt(spread, 0)]
        if cpu:
            row.append(_fmt(statistics.median(r.page_faults), 0) if r.page_faults else "")
        if section == "model":
            row.append(_fmt(r.items_per_s, 0))
        row += [
            _fmt(r.speed_vs_plain),
            _fmt(r.speed_vs_chunked),
            _fmt(r.step_mem_mib, 1) if r.step_mem_mib is not None else r.mem_kind,
            _fmt(r.first_call_s, 1 if r.mode == "compiled" else 3),
            "" if r.graph_breaks is None else r.graph_breaks,
        ]
        rows.append(row)
    headers = ["mode", "case", "g", "impl", "median ms", "iqr %"]
    if cpu:
        headers.append("faults/step")
    if section == "model":
        headers.append("samples/s")
    headers += ["vs plain", "vs chunked", "step mem MiB", "first call s", "graph breaks"]
    rows = [row + [""] * (len(headers) - len(row)) for row in rows]  # error rows are short
    return tabulate(rows, headers=headers, disable_numparse=True)


def _device_slug(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
        return "cuda-" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
    return "cpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> float | None:
    """The 1-minute load average, where the platform has one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def source_digest(root: Path | None = None) -> str:
    """SHA-256 of the package's source files (``*.py``, ``*.c``, ``*.cpp`` under ``root``,
    default this package, by relative path): which code produced a JSON file, when the machine
    that ran it had a checkout whose git metadata did not match its files."""
    root = Path(__file__).resolve().parent if root is None else root
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c", ".cpp") and p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _meta(args: argparse.Namespace, device: str, argv: Sequence[str]) -> dict[str, Any]:
    from . import __version__

    try:
        import torchvision

        tv_version: str | None = torchvision.__version__
    except ImportError:
        tv_version = None
    return {
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": list(argv),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": tv_version,
        "fxghost": __version__,
        "git_commit": _git_commit(),
        "source_sha256": source_digest(),
        "quick": args.quick,
        "compile": "compiled" in args.modes,
        "modes": args.modes,
        "cases": args.cases,
        "cold_compile": not args.compile_cache,
        # Allocator settings change CPU results a lot (page faults of fresh memory): record them.
        "allocator_env": {
            k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "THP_", "LD_PRELOAD"))
        },
        "ratios": "speed: reference median time / implementation median time, same mode",
        "step_mem": "peak memory of one step above what was live before it, MiB",
    }


# --------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text.strip()


def _choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(choices)}, got {text!r}"
            )
        return [c for c in choices if c in values]  # canonical order

    return parse


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``fxghost bench`` argument parser."""
    p = argparse.ArgumentParser(
        prog="fxghost bench",
        description=(
            "Benchmark plain BatchNorm, the chunked ghost-BN reference and fxghost, eager and "
            "under torch.compile: one layer (forward + backward) and whole training steps. "
            "Tables go to stdout, progress to stderr, raw numbers to a JSON file."
        ),
        epilog=(
            "Ratios are speeds in the same mode: 'vs plain' = plain time / implementation "
            "time (above 1 = faster). 'step mem' is the peak memory of one step above what was "
            "live before it (CUDA allocator on GPU, resident set on CPU, approximate)."
        ),
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few repeats: a smoke test of the suite, not a measurement",
    )
    p.add_argument(
        "--sections",
        type=_choice_list(SECTIONS),
        default=list(SECTIONS),
        help="comma-separated sections to run (default: layer,model)",
    )
    p.add_argument(
        "--impls",
        type=_choice_list(IMPLS),
        default=list(IMPLS),
        help="comma-separated implementations (default: plain,chunked,fxghost)",
    )
    p.add_argument(
        "--modes",
        type=_choice_list(MODES),
        default=list(MODES),
        help="comma-separated modes to run (default: eager,compiled)",
    )
    p.add_argument("--no-compile", action="store_true", help="eager mode only (--modes eager)")
    p.add_argument(
        "--cases",
        type=_nonempty,
        nargs="+",
        default=None,
        metavar="TEXT",
        help="run only the cases whose label contains one of these strings, e.g. "
        "--cases '(16384,512)' resnet50 (default: every case of the device)",
    )
    p.add_argument(
        "--compile-cache",
        action="store_true",
        help="keep Inductor's on-disk caches (default: a fresh cache per compiled "
        "case, so that compile times are cold and comparable)",
    )
    p.add_argument(
        "--repeats",
        type=_positive,
        default=None,
        help="timed steps per implementation and case (default: per section and device)",
    )
    p.add_argument(
        "--warmup",
        type=_non_negative,
        default=None,
        help="untimed rounds after the first call (default: per section and device)",
    )
    p.add_argument(
        "--block",
        type=_positive,
        default=None,
        help="steps each implementation runs in a row per round, the first of them untimed "
        "when above 1 (default: 4 for CPU layers, 3 for CPU models, 3 for CUDA layers, 1 for CUDA "
        "models)",
    )
    p.add_argument(
        "--ghost-sizes",
        type=_int_list,
        default=None,
        help="comma-separated ghost batch sizes replacing each case's own, "
        "e.g. 16,32 (applies to both sections)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output path (default: benchmarks/results/<device>-<timestamp>.json)",
    )
    return p


def _default_timing(device: str, quick: bool) -> tuple[_Timing, _Timing]:
    """(layer, model) warm-up and repeats: GPU steps take milliseconds, CPU steps up to ~1 s."""
    if quick:
        return _Timing(1, 3), _Timing(0, 2)
    if device == "cuda":
        # The caching allocator keeps one implementation's memory pattern from reaching the next,
        # but a layer step that is short enough to be bound by the host's CPU runs up to 1.8x
        # slower right after another implementation's steps (the Python, dispatch and launch
        # paths gone cold in the CPU's caches: H200 host, plain BatchNorm (16384,512), 0.56 ms
        # against 0.31 ms back to back). A training loop repeats one step: layer steps run in
        # blocks of three, the first untimed. Model steps (tens of ms) are not affected.
        return _Timing(10, 50, block=3), _Timing(5, 20)
    # CPU layer steps take milliseconds but vary a lot (page faults of fresh memory): many rounds,
    # in blocks of steps (see _run_job).
    return _Timing(3, 45, block=4), _Timing(1, 8, block=3)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return 0, or 1 when some implementation failed in some case."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")

    layer_timing, model_timing = _default_timing(device, args.quick)
    overrides = {
        k: v
        for k, v in (("warmup", args.warmup), ("repeats", args.repeats), ("block", args.block))
        if v is not None
    }
    layer_timing, model_timing = (
        replace(layer_timing, **overrides),
        replace(model_timing, **overrides),
    )
    if args.no_compile:
        args.modes = ["eager"]
    jobs = _jobs(
        args.sections,
        args.modes,
        device,
        args.quick,
        args.ghost_sizes,
        layer_timing,
        model_timing,
        args.cases,
    )
    if not jobs:
        parser.error(f"no case matches --cases {' '.join(args.cases or [])} on {device}")

    torch_device = torch.device(device)
    load_before = _load_average()
    if device == "cpu" and load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        _progress(
            f"warning: load average {load_before:.1f} on {os.cpu_count()} cores: other processes "
            "compete for the CPU, times will be noisy (ratios within a case still compare)"
        )
    cpu_mem = _CpuPeakMemory()
    results: list[Result] = []
    warm_compile_s: float | None = None
    t_start = time.perf_counter()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    # Random data can make denormals, which slow CPU arithmetic by orders of magnitude.
    flushed = torch.set_flush_denormal(True) if device == "cpu" else False
    try:
        if device == "cuda":
            # As a training script would: lets cuDNN pick its fastest convolution algorithms.
            torch.backends.cudnn.benchmark = True
        for i, job in enumerate(jobs, 1):
            _progress(f"[{i}/{len(jobs)}] {job.title}: {', '.join(args.impls)} ...")
            t0 = time.perf_counter()
            # --quick skips the compiler warm-up: its compile times are not measurements anyway.
            if job.mode == "compiled" and warm_compile_s is None and not args.quick:
                warm_compile_s = _warm_compiler(torch_device, not args.compile_cache)
                _progress(f"      compiler warm-up {warm_compile_s:.1f} s (not charged)")
            results += _run_job(job, args.impls, torch_device, not args.compile_cache, cpu_mem)
            _progress(f"      done in {time.perf_counter() - t0:.1f} s")
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if flushed:
            torch.set_flush_denormal(False)
    _set_ratios(results)

    title = {
        "layer": "One layer, forward + backward, training mode",
        "model": "Whole-model training step (forward, loss, backward, SGD step)",
    }
    for section in args.sections:
        if not any(r.section == section for r in results):
            continue  # --cases left none of its cases
        print(f"\n## {title[section]} ({device})\n")
        print(_table(section, results))
    print()

    meta = _meta(args, device, argv)
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    meta["compiler_warmup_s"] = warm_compile_s
    meta["load_average"] = {"before": load_before, "after": _load_average()}
    meta["timing"] = {"layer": asdict(layer_timing), "model": asdict(model_timing)}
    out = args.out
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("benchmarks") / "results" / f"{_device_slug(device)}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    _progress(f"results written to {out} ({meta['total_s']} s in all)")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
