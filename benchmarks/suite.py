"""fxghost's benchmark suite: plain BatchNorm, the chunked reference and fxghost, side by side.

Run it as ``python benchmarks/run.py`` from the repository root (``--help`` lists the options).
Two sections, each measured in eager mode and under ``torch.compile``:

- ``layer``: one BatchNorm layer, forward + backward in training mode.
- ``model``: a whole training step (forward, loss, backward, SGD step) of a small network.

Every case builds the three implementations from one BatchNorm (or one model) with the same
initial weights, then times them back to back, interleaved round by round (``harness.py``), so
that the drift of a noisy machine hits all three alike. Results are printed as one table per
section on stdout and saved as JSON; progress goes to stderr.

Ratios are speeds: ``vs plain`` is ``plain time / implementation time`` measured in the same mode
(above 1 is faster than plain BatchNorm), ``vs chunked`` likewise against the chunked reference.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import (
    Builder,
    CpuPeakMemory,
    Job,
    Result,
    Step,
    Timing,
    progress,
    run_job,
    set_ratios,
    warm_compiler,
)
from torch import Tensor, nn

import fxghost
from fxghost import backends
from fxghost.reference import apply_chunked_ghost_batchnorm

__all__ = ["IMPLS", "LayerCase", "ModelCase", "build_parser", "jobs", "main", "source_digest"]

IMPLS: tuple[str, ...] = ("plain", "chunked", "fxghost")
SECTIONS: tuple[str, ...] = ("layer", "model")
MODES: tuple[str, ...] = ("eager", "compiled")
# Raw JSON goes beside the suite, whatever the working directory (git ignores the folder).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGE = Path(fxghost.__file__).resolve().parent

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
    # The implementations compiled, where not all (the chunked reference of a whole ResNet takes
    # minutes to compile on 2 CPU cores).
    compiled_impls: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        """Human-readable description of the model and its input."""
        if self.name == "mlp":
            return "mlp " + "-".join(str(w) for w in self.mlp_widths)
        extra = " bf16 cl" if self.autocast_bf16 and self.channels_last else ""
        return f"{self.name} {self.image_size}px{extra}"


def layer_cases(device: str, quick: bool) -> list[LayerCase]:
    """The layer shapes for ``device``, or tiny ones with ``quick``."""
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
        LayerCase((128, 64, 16, 16), (32,)),
        LayerCase((128, 64, 16, 16), (16,), compile=False),
        LayerCase((128, 64, 16, 16), (32,), channels_last=True, compile=False),
        LayerCase((128, 64, 16, 16), (32,), torch.bfloat16, channels_last=True, compile=False),
        LayerCase((128, 64, 16, 16), (32,), torch.float16, channels_last=True, compile=False),
        LayerCase((8192, 256), (128,)),
        LayerCase((8192, 256), (32,), compile=False),
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
    # Compiling ResNet-18 with chunked BN takes minutes on 2 cores: plain and fxghost only.
    return [
        ModelCase("resnet18", 64, (16,), image_size=64, compiled_impls=("plain", "fxghost")),
        ModelCase(
            "resnet18",
            64,
            (16,),
            image_size=64,
            autocast_bf16=True,
            channels_last=True,
            compile=False,
        ),
        ModelCase("mlp", 1024, (32,), mlp_widths=(256, 512, 512, 10)),
    ]


# --------------------------------------------------------------------------------------------
# Building the implementations


def _apply_impl(impl: str, module: nn.Module, g: int, backend: str = "auto") -> nn.Module:
    """``module`` (already a private copy) with its BatchNorm layers as ``impl`` computes them."""
    if impl == "plain":
        return module
    if impl == "chunked":
        return apply_chunked_ghost_batchnorm(module, g)
    if impl == "fxghost":
        return fxghost.transform(module, ghost_batch_size=g, backend=backend)
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


def layer_steps(
    case: LayerCase, g: int, device: torch.device, backend: str = "auto"
) -> tuple[Builder, dict[str, Any]]:
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
        module = _apply_impl(impl, nn.Sequential(copy.deepcopy(base)), g, backend)
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


def model_steps(
    case: ModelCase, g: int, device: torch.device, backend: str = "auto"
) -> tuple[Builder, dict[str, Any]]:
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
        net = _apply_impl(impl, model, g, backend)
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


def jobs(
    sections: Sequence[str],
    modes: Sequence[str],
    device: str,
    quick: bool,
    ghost_sizes: Sequence[int] | None,
    layer_timing: Timing,
    model_timing: Timing,
    cases: Sequence[str] | None = None,
    backend: str = "auto",
) -> list[Job]:
    """All jobs in run order: by section, then mode, then case. With ``ghost_sizes`` given, cases
    that differ only in their own ghost sizes (one shape listed once per size) run once per size.
    With ``cases`` given, only cases whose label contains one of those strings run. ``backend``
    is fxghost's, as ``fxghost.transform`` takes it."""
    torch_device = torch.device(device)
    found: list[Job] = []
    seen: set[tuple[str, str, str, int]] = set()

    def add(job: Job) -> None:
        key = (job.section, job.mode, job.case, job.g)
        if cases and not any(c in job.case for c in cases):
            return
        if key not in seen:
            seen.add(key)
            found.append(job)

    for section in sections:
        for mode in modes:
            if section == "layer":
                for lc in layer_cases(device, quick):
                    if mode == "compiled" and not lc.compile:
                        continue
                    for g in ghost_sizes or lc.ghost_sizes:
                        label = "(" + ",".join(map(str, lc.shape)) + ") " + lc.dtype_label
                        add(
                            Job(
                                section,
                                mode,
                                label,
                                g,
                                _bind(layer_steps, lc, g, torch_device, backend),
                                layer_timing,
                            )
                        )
            else:
                for mc in model_cases(device, quick):
                    if mode == "compiled" and not mc.compile:
                        continue
                    for g in ghost_sizes or mc.ghost_sizes:
                        add(
                            Job(
                                section,
                                mode,
                                f"{mc.label} batch {mc.batch}",
                                g,
                                _bind(model_steps, mc, g, torch_device, backend),
                                model_timing,
                                batch=mc.batch,
                                impls=mc.compiled_impls if mode == "compiled" else None,
                            )
                        )
    return found


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
            _fmt(r.saved_mib, 1),
            _fmt(r.first_call_s, 1 if r.mode == "compiled" else 3),
            "" if r.graph_breaks is None else r.graph_breaks,
        ]
        rows.append(row)
    headers = ["mode", "case", "g", "impl", "median ms", "iqr %"]
    if cpu:
        headers.append("faults/step")
    if section == "model":
        headers.append("samples/s")
    headers += [
        "vs plain",
        "vs chunked",
        "step mem MiB",
        "saved MiB",
        "first call s",
        "graph breaks",
    ]
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
    default the fxghost package that runs, by relative path): which code produced a JSON file,
    when the machine that ran it had a checkout whose git metadata did not match its files."""
    root = _PACKAGE if root is None else root
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
            cwd=_PACKAGE,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _meta(args: argparse.Namespace, device: str, argv: Sequence[str]) -> dict[str, Any]:
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
        "fxghost": fxghost.__version__,
        "git_commit": _git_commit(),
        "source_sha256": source_digest(),
        "quick": args.quick,
        "compile": "compiled" in args.modes,
        "modes": args.modes,
        "cases": args.cases,
        "backend": args.backend,
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
    """The suite's argument parser."""
    p = argparse.ArgumentParser(
        prog="benchmarks/run.py",
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
        "--backend",
        choices=backends.NAMES,
        default="auto",
        help="fxghost's backend, as fxghost.transform(..., backend=) takes it (default: auto)",
    )
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
        help="JSON output path (default: benchmarks/results/<device>-<timestamp>.json, beside "
        "this script)",
    )
    return p


def _default_timing(device: str, quick: bool) -> tuple[Timing, Timing]:
    """(layer, model) warm-up and repeats: GPU steps take milliseconds, CPU steps up to ~1 s."""
    if quick:
        return Timing(1, 3), Timing(0, 2)
    if device == "cuda":
        # The caching allocator keeps one implementation's memory pattern from reaching the next,
        # but a layer step that is short enough to be bound by the host's CPU runs up to 1.8x
        # slower right after another implementation's steps (the Python, dispatch and launch
        # paths gone cold in the CPU's caches: H200 host, plain BatchNorm (16384,512), 0.56 ms
        # against 0.31 ms back to back). A training loop repeats one step: layer steps run in
        # blocks of three, the first untimed. Model steps (tens of ms) are not affected.
        return Timing(10, 50, block=3), Timing(5, 20)
    # CPU layer steps take milliseconds but vary a lot (page faults of fresh memory): many rounds,
    # in blocks of steps (see run_job).
    return Timing(3, 45, block=4), Timing(1, 8, block=3)


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
    job_list = jobs(
        args.sections,
        args.modes,
        device,
        args.quick,
        args.ghost_sizes,
        layer_timing,
        model_timing,
        args.cases,
        args.backend,
    )
    if not job_list:
        parser.error(f"no case matches --cases {' '.join(args.cases or [])} on {device}")

    torch_device = torch.device(device)
    load_before = _load_average()
    if device == "cpu" and load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        progress(
            f"warning: load average {load_before:.1f} on {os.cpu_count()} cores: other processes "
            "compete for the CPU, times will be noisy (ratios within a case still compare)"
        )
    cpu_mem = CpuPeakMemory()
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
        for i, job in enumerate(job_list, 1):
            impls = [impl for impl in args.impls if job.impls is None or impl in job.impls]
            progress(f"[{i}/{len(job_list)}] {job.title}: {', '.join(impls)} ...")
            t0 = time.perf_counter()
            # --quick skips the compiler warm-up: its compile times are not measurements anyway.
            if job.mode == "compiled" and warm_compile_s is None and not args.quick:
                warm_compile_s = warm_compiler(torch_device, not args.compile_cache)
                progress(f"      compiler warm-up {warm_compile_s:.1f} s (not charged)")
            results += run_job(job, impls, torch_device, not args.compile_cache, cpu_mem)
            progress(f"      done in {time.perf_counter() - t0:.1f} s")
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        if device == "cuda":
            # Only where it was set: a process that imported torch.testing's internals refuses any
            # assignment to cuDNN's flags.
            torch.backends.cudnn.benchmark = cudnn_benchmark
    set_ratios(results)

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
        out = RESULTS_DIR / f"{_device_slug(device)}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [asdict(r) for r in results]}
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    progress(f"results written to {out} ({meta['total_s']} s in all)")
    return 1 if any(r.error for r in results) else 0
