"""``fxghost bench MODEL``: a training step of your model with plain BatchNorm and with fxghost
(and optionally the chunked reference), at your batch shape and ghost size, on this machine.

The implementations are built from one model with the same weights and timed in one run,
interleaved step by step, so that the ratios compare like with like on a noisy machine. The
project's fixed benchmark suite lives in the repository's ``benchmarks/`` folder, not here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tabulate import tabulate
from torch import Tensor, nn

from . import _version, report, transform
from .reference import apply_chunked_ghost_batchnorm

__all__ = ["DESCRIPTION", "EPILOG", "NOTHING_TO_GHOST", "add_arguments", "positive_int", "run"]

DESCRIPTION = """\
Time training steps (forward, loss, backward, SGD step) of MODEL with plain BatchNorm and with
fxghost, on random inputs of the given shape, and print their ratio. The loss is the mean square
of the model's floating-point outputs, so any model that takes one float tensor will do."""

#: The exit status of a bench whose model has no BatchNorm layer that fxghost rewrites: the two
#: implementations would be the same model, and their ratio would mean nothing.
NOTHING_TO_GHOST = 3

EPILOG = f"""\
exit status: 0 timed; 1 the model does not trace; 2 bad arguments; {NOTHING_TO_GHOST} nothing to
ghost: the model has no BatchNorm layer that fxghost rewrites (nothing is timed)"""

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def positive_int(text: str) -> int:
    """An argparse type: ``text`` as an int of at least 1 (the commands' sizes and counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a batch shape N,C[,...], got {text!r}")
    return shape


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's arguments."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="as for `fxghost inspect`: package.module:NAME (an nn.Module or a callable "
        "returning one), a torchvision or a timm model name (torchvision:NAME or timm:NAME "
        "picks the source)",
    )
    parser.add_argument(
        "--shape",
        type=_shape,
        default=(64, 3, 224, 224),
        metavar="N,C,...",
        help="the training batch's shape (default 64,3,224,224)",
    )
    parser.add_argument("--ghost-batch-size", "-g", type=positive_int, default=32, metavar="G")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default: cuda when available",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each implementation (its first step, compilation "
        "included, is reported apart)",
    )
    parser.add_argument(
        "--chunked",
        action="store_true",
        help="also time the chunked reference (one BatchNorm call per ghost batch)",
    )
    parser.add_argument(
        "--autocast",
        choices=sorted(_AUTOCAST),
        default=None,
        help="run the forward under torch.autocast in this dtype",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="model and input in channels_last memory format (4-D inputs)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=10,
        metavar="R",
        help="timed steps per implementation (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative,
        default=2,
        metavar="W",
        help="untimed steps per implementation after the first (default 2)",
    )


def _tensors(out: Any) -> Iterator[Tensor]:
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, dict):  # also HuggingFace's ModelOutput
        for value in out.values():
            yield from _tensors(value)
    elif isinstance(out, (list, tuple)):  # also torchvision's auxiliary-output namedtuples
        for value in out:
            yield from _tensors(value)


def _loss(out: Any) -> Tensor:
    parts = [t.float().square().mean() for t in _tensors(out) if t.is_floating_point()]
    if not parts:
        raise ValueError("the model's output holds no floating-point tensor to take a loss of")
    return torch.stack(parts).sum()


def _apply(impl: str, model: nn.Module, g: int) -> nn.Module:
    if impl == "fxghost":
        return transform(model, g)
    if impl == "chunked":
        return apply_chunked_ghost_batchnorm(model, g)
    return model


def run(args: argparse.Namespace, load_model: Callable[[str], tuple[nn.Module, str | None]]) -> int:
    """Run ``fxghost bench`` with parsed ``args``; ``load_model`` resolves MODEL as ``inspect``
    does. Bad arguments raise ValueError."""
    shape, g = tuple(args.shape), args.ghost_batch_size
    if shape[0] < g:
        raise ValueError(f"the batch ({shape[0]} samples) is smaller than the ghost batch size {g}")
    if args.channels_last and len(shape) != 4:
        raise ValueError(f"--channels-last needs a 4-D shape, got {len(shape)}-D")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available")
    impls: Sequence[str] = ("plain", "fxghost", "chunked") if args.chunked else ("plain", "fxghost")

    torch.manual_seed(0)
    base, source = load_model(args.model)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    base = base.to(device, memory_format=fmt)  # type: ignore[call-overload]
    x = torch.randn(shape, device=device).contiguous(memory_format=fmt)
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    if args.autocast:
        dtype = _AUTOCAST[args.autocast]

        def autocast() -> contextlib.AbstractContextManager[Any]:
            return torch.autocast(torch.device(device).type, dtype=dtype)

    def make_step(net: Callable[..., Any], owner: nn.Module) -> Callable[[], None]:
        # A small learning rate: the loss is arbitrary, and the weights must stay finite.
        opt = torch.optim.SGD(owner.parameters(), lr=1e-4)

        def step() -> None:
            with autocast():
                out = net(x)
            _loss(out).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def timed(step: Callable[[], None]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    steps, first_s = {}, {}
    for impl in impls:
        model = copy.deepcopy(base)  # each implementation steps its own copy of the weights
        net = _apply(impl, model, g).train()
        if impl == "fxghost":
            rep = report(net)
            if not rep.rewritten:
                # Both implementations would run the same model: a ratio would be noise.
                found = (
                    f"no BatchNorm layer rewritten ({len(rep.skipped)} skipped: "
                    f"`fxghost inspect {args.model}` says why)"
                    if rep.skipped
                    else "no BatchNorm layer found"
                )
                sys.stderr.write(
                    f"fxghost bench: nothing to ghost in {args.model}: {found}; nothing timed\n"
                )
                return NOTHING_TO_GHOST
        steps[impl] = make_step(torch.compile(net) if args.compile else net, model)
    for impl in impls:
        first_s[impl] = timed(steps[impl])

    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    )
    if source:
        print(source)
    print(f"fxghost {_version.__version__}, torch {torch.__version__}, {device} ({where})")
    mode = "torch.compile" if args.compile else "eager"
    extras = [f"autocast {args.autocast}"] * bool(args.autocast)
    extras += ["channels_last"] * args.channels_last
    print(
        f"input {shape}, ghost batch size {g} ({-(-shape[0] // g)} ghost batches), {mode}"
        + "".join(f", {e}" for e in extras)
    )
    print(rep.summary() + "\n", flush=True)

    for _ in range(args.warmup):
        for impl in impls:
            steps[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(args.repeats):
        # Alternating orders, and an untimed step before each timed one: a step right after
        # another implementation's pays for that one's memory pattern, which training never sees.
        for impl in impls if r % 2 == 0 else impls[::-1]:
            steps[impl]()
            times[impl].append(timed(steps[impl]) * 1e3)

    median = {impl: statistics.median(ts) for impl, ts in times.items()}
    headers = ["", "median ms", "samples/s", "vs plain"]
    headers += ["vs chunked"] * args.chunked
    headers.append("first step s" + (" (compile)" if args.compile else ""))
    rows = []
    for impl in impls:
        row: list[Any] = [
            impl,
            f"{median[impl]:.2f}",
            f"{shape[0] / median[impl] * 1e3:.0f}",
            f"{median['plain'] / median[impl]:.2f}x",
        ]
        if args.chunked:
            row.append(f"{median['chunked'] / median[impl]:.2f}x")
        rows.append([*row, f"{first_s[impl]:.3g}"])
    print(tabulate(rows, headers=headers, disable_numparse=True))
    print(
        f"\nmedian of {args.repeats} steps each, interleaved; 'vs plain' is plain's time over "
        "this one's (above 1 is faster)"
    )
    return 0
