"""The suite's measurement machinery: interleaved timing of implementations, step memory, page
faults, and the records they fill. Nothing here knows the suite's cases (``suite.py``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

import torch
from torch import nn

__all__ = [
    "Builder",
    "Clock",
    "CpuPeakMemory",
    "Job",
    "Result",
    "Step",
    "Timing",
    "page_faults",
    "progress",
    "round_orders",
    "run_job",
    "set_ratios",
    "warm_compiler",
]

Step = Callable[[], None]
# Builds the step of an implementation, eager or compiled: build(impl, compiled) -> step.
Builder = Callable[[str, bool], Step]


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
    # Bytes of the distinct storages autograd saves for backward in one step: exact where the
    # peak is allocator-dependent (on CPU it moves by 10% from step to step).
    saved_mib: float | None = None
    graph_breaks: int | None = None
    graph_break_reasons: list[str] = field(default_factory=list)
    graphs: int | None = None
    items_per_s: float | None = None  # models: samples per second at the median
    speed_vs_plain: float | None = None
    speed_vs_chunked: float | None = None
    error: str | None = None


def set_ratios(results: Sequence[Result]) -> None:
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


def page_faults() -> int | None:
    """Page faults of this process so far (all threads), where ``getrusage`` reports them.

    On CPU a step's time depends on whether its tensors' memory is fresh from the OS: each fresh
    4 KB page faults on first touch (measured 1.5-3.6 us each on the project's VM, so 1024 of them,
    one 4 MB activation, can cost more than a layer's kernels). Recorded with the times, it tells
    an implementation's slow steps from the allocator's."""
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


class Clock:
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
            f0 = page_faults()
            t0 = time.perf_counter()
            step()
            out.setdefault(key, []).append((time.perf_counter() - t0) * 1e3)
            f1 = page_faults()
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


class CpuPeakMemory:
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


def saved_activation_mib(step: Step) -> float:
    """MiB of the distinct storages that ``step``'s forward saves for backward (activations and
    the parameters that ops save). All of them are alive together when the forward ends, so
    their data pointers tell them apart."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2**20


def cuda_step_memory(step: Step) -> float:
    """MiB that ``step`` allocates on the GPU at its peak above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def dynamo_snapshot() -> tuple[dict[str, int], int]:
    """Dynamo's running counts of graph breaks (by reason) and of graphs compiled; they are not
    cleared by ``torch._dynamo.reset``, so callers take differences."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"]), int(counters["stats"]["unique_graphs"])


def quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentiles."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[0], q[2]


# --------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class Timing:
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
class Job:
    """One case at one ghost size in one mode: all implementations, timed together."""

    section: str
    mode: str
    case: str
    g: int
    make: Callable[[], tuple[Builder, dict[str, Any]]]
    timing: Timing
    batch: int | None = None  # models: samples per step
    impls: tuple[str, ...] | None = None  # the implementations this job runs, where not all

    @property
    def title(self) -> str:
        return f"{self.section} {self.mode} {self.case} g={self.g}"


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def compile_scope(enabled: bool) -> Iterator[None]:
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


def cold_cache(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """With ``enabled``, an empty Inductor cache (on disk and in memory) for one compilation, so
    that its time depends neither on earlier runs nor on the implementation compiled before it.
    Code already compiled keeps working once the cache is gone."""
    if not enabled:
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache

    return fresh_cache()


def warm_compiler(device: torch.device, cold: bool) -> float:
    """Compile and run a tiny training step once, so that the one-time costs of the process
    (imports, toolchain checks) are not charged to the first implementation compiled."""
    import torch._dynamo

    t0 = time.perf_counter()
    with cold_cache(cold):
        lin = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).to(device)
        torch.compile(lin, dynamic=False)(torch.randn(16, 8, device=device)).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    torch._dynamo.reset()
    return time.perf_counter() - t0


def round_orders(impls: list[str]) -> list[list[str]]:
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


def run_job(
    job: Job,
    impls: Sequence[str],
    device: torch.device,
    cold_compile: bool,
    cpu_mem: CpuPeakMemory,
) -> list[Result]:
    """Build, warm up and time every implementation of ``job``, interleaved."""
    compiled = job.mode == "compiled"
    clock = Clock(device)
    results = {impl: Result(job.section, job.mode, impl, job.case, job.g) for impl in impls}
    steps: dict[str, Step] = {}
    with compile_scope(compiled):
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
                breaks0, graphs0 = dynamo_snapshot()
                with cold_cache(compiled and cold_compile):
                    step = build(impl, compiled)
                    r.first_call_s = clock.wall(step)
                if compiled:
                    breaks1, graphs1 = dynamo_snapshot()
                    new = {k: n - breaks0.get(k, 0) for k, n in breaks1.items()}
                    r.graph_breaks, r.graphs = sum(new.values()), graphs1 - graphs0
                    r.graph_break_reasons = [str(k)[:300] for k, n in new.items() if n > 0]
                    progress(
                        f"      {impl}: first call (compile) {r.first_call_s:.1f} s, "
                        f"{r.graphs} graph(s), {r.graph_breaks} graph break(s)"
                    )
                steps[impl] = step
            except Exception as exc:
                r.error = f"{type(exc).__name__}: {exc}"
                progress(f"      {impl}: FAILED {r.error[:300]}")
        times: dict[str, list[float]] = {}
        faults: dict[str, list[int]] = {}
        orders = round_orders(list(steps))
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
        # Resident peaks on CPU vary from step to step with glibc's choices: the median of
        # interleaved measurements.
        peaks: dict[str, list[float]] = {impl: [] for impl in steps}
        for _ in range(1 if device.type == "cuda" else 3):
            for impl in list(steps):
                r = results[impl]
                try:
                    if device.type == "cuda":
                        peak: float | None = cuda_step_memory(steps[impl])
                        r.mem_kind = "cuda allocated"
                    else:
                        peak = cpu_mem.measure(steps[impl])
                        r.mem_kind = "rss median of 3" if peak is not None else "n/a"
                    if peak is not None:
                        peaks[impl].append(peak)
                except Exception as exc:
                    r.error = f"{type(exc).__name__}: {exc}"
                    del steps[impl]
        for impl in list(steps):
            r = results[impl]
            r.step_mem_mib = statistics.median(peaks[impl]) if peaks[impl] else None
            try:
                r.saved_mib = saved_activation_mib(steps[impl])
            except Exception as exc:
                r.error = f"{type(exc).__name__}: {exc}"
                continue
            ts = times.get(impl, [])
            if ts:
                r.times_ms = ts
                r.page_faults = faults.get(impl, [])
                r.median_ms, r.p25_ms, r.p75_ms = quantiles(ts)
                if job.batch is not None:
                    r.items_per_s = job.batch / (r.median_ms / 1e3)
        steps.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(results.values())
