"""Where a layer step's time goes on a GPU: CPU (Python, launches) or the kernels.

    python benchmarks/profile_layer.py                      # the default cases
    python benchmarks/profile_layer.py --case 16384,512:fp32:128

For each case and implementation: the step's wall time when steps are queued back to back (what
the suite's CUDA events see), the CPU time to queue one step (Python, dispatch and launches), the
GPU time of its kernels (the profiler's CUDA activity, summed per step) and its launch count; then
the kernels that take the most GPU time. A step is CPU-bound when its queueing time is close to its
wall time and well above its kernels' time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the suite beside this script, and its fxghost

import suite  # noqa: E402
from harness import Builder, Step  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CASES = (
    "16384,512:fp32:128",
    "256,2048,7,7:bf16cl:32",
    "256,256,56,56:bf16cl:32",
    "resnet50",
)


def _builder(text: str, device: torch.device) -> tuple[Builder, int]:
    """The suite's step builder for a case, and how many steps to time per round."""
    if text == "resnet50":  # the suite's CUDA model case
        case = suite.model_cases("cuda", False)[0]
        return suite.model_steps(case, case.ghost_sizes[0], device)[0], 5
    layer, g = _case(text)
    return suite.layer_steps(layer, g, device)[0], 50


def _case(text: str) -> tuple[suite.LayerCase, int]:
    """``shape:dtype[cl]:g``, e.g. ``256,2048,7,7:bf16cl:32``."""
    shape, dtype, g = text.split(":")
    cl = dtype.endswith("cl")
    case = suite.LayerCase(
        tuple(int(v) for v in shape.split(",")),
        (int(g),),
        DTYPES[dtype.removesuffix("cl")],
        channels_last=cl,
    )
    return case, int(g)


def _profile(step: Step, steps: int) -> tuple[float, int, list[tuple[str, float, int]]]:
    """GPU microseconds per step, launches per step, and the top kernels (name, us/step, calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(e.name, []).append(e.device_time)
    total = sum(sum(v) for v in kernels.values()) / steps
    launches = sum(len(v) for v in kernels.values()) // steps
    top = sorted(
        ((k, sum(v) / steps, len(v) // steps) for k, v in kernels.items()), key=lambda r: -r[1]
    )
    return total, launches, top


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", help="shape:dtype[cl]:g or resnet50 (repeatable)")
    p.add_argument("--impls", default="plain,fxghost")
    p.add_argument("--top", type=int, default=6)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    device = torch.device("cuda")
    from tabulate import tabulate

    rows, tops = [], []
    for text in args.case or DEFAULT_CASES:
        build, steps = _builder(text, device)
        for impl in args.impls.split(","):
            step = build(impl, False)
            for _ in range(10):
                step()
            torch.cuda.synchronize()
            queue, wall = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                queue.append((t1 - t0) / steps * 1e6)
                wall.append((t2 - t0) / steps * 1e6)
            try:
                gpu, launches, top = _profile(step, min(steps, 20))
            except Exception as e:  # the profiler's event API moves between torch versions
                print(f"{text} {impl}: profiler failed: {e!r}", file=sys.stderr)
                gpu, launches, top = float("nan"), -1, []
            rows.append(
                [text, impl, statistics.median(wall), statistics.median(queue), gpu, launches]
            )
            tops += [[text, impl, name[:70], us, n] for name, us, n in top[: args.top]]
    print(
        tabulate(
            rows,
            headers=[
                "case",
                "impl",
                "wall us/step",
                "CPU queue us/step",
                "GPU kernels us/step",
                "launches/step",
            ],
            floatfmt=".1f",
        )
    )
    print()
    print(
        tabulate(tops, headers=["case", "impl", "kernel", "us/step", "calls/step"], floatfmt=".1f")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
