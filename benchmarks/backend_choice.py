#!/usr/bin/env python
"""Whole-model training steps with each backend, the measurement behind ``backend="auto"``'s table
(fxghost/backends/__init__.py): a torchvision ResNet-18 (and an MLP with BatchNorm1d) on this
machine's device, plain BatchNorm against fxghost with each backend that can run here, eager and
under ``torch.compile``.

Steps of every variant are interleaved round by round in one process, so the ratios compare
like with like on a noisy machine; the median of each variant's steps is reported.

    python benchmarks/backend_choice.py                 # CPU: resnet18 64 px, batch 64, g=16
    python benchmarks/backend_choice.py --no-compile --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxghost  # noqa: E402
from fxghost.backends import cpu  # noqa: E402


def _models(device: torch.device) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10)
    mlp = nn.Sequential(
        nn.Linear(256, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )
    return {
        "resnet18 64px b64": (
            resnet.to(device),
            torch.randn(64, 3, 64, 64, device=device),
            torch.randint(0, 10, (64,), device=device),
        ),
        "mlp b1024": (
            mlp.to(device),
            torch.randn(1024, 256, device=device),
            torch.randint(0, 10, (1024,), device=device),
        ),
    }


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ghost-batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    backends = ["torch"] + (["cpu"] if device.type == "cpu" and cpu.available() else [])
    if device.type == "cuda":
        backends.append("triton")
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}")
    modes = [False] if args.no_compile else [False, True]
    for name, (model, x, y) in _models(device).items():
        for compiled in modes:
            variants: dict[str, Callable[[], None]] = {}
            for label in ["plain", *backends]:
                m = copy.deepcopy(model)
                run = (
                    m
                    if label == "plain"
                    else fxghost.transform(m, args.ghost_batch_size, backend=label)
                )
                if compiled:
                    run = torch.compile(run)
                opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                variants[label] = functools.partial(_step, run, opt, x, y)
            for fn in variants.values():  # warm-up (and compile)
                fn()
                fn()
            times: dict[str, list[float]] = {label: [] for label in variants}
            for _ in range(args.rounds):
                for label, fn in variants.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[label].append(time.perf_counter() - start)
            plain = statistics.median(times["plain"])
            mode = "compiled" if compiled else "eager"
            for label, ts in times.items():
                med = statistics.median(ts)
                print(
                    f"{name:18s} {mode:8s} {label:6s} {med * 1e3:8.2f} ms  "
                    f"{plain / med:5.2f}x plain",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
