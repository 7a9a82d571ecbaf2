"""``fxghost`` / ``python -m fxghost``: demo, inspect, bench."""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from inspect import signature
from typing import Any
from unittest import mock

import torch
from tabulate import tabulate
from torch import fx, nn

from . import _userbench, _version, report, transform
from ._trace import TracingError
from ._userbench import positive_int
from .reference import apply_chunked_ghost_batchnorm

__all__ = ["main"]

_DESCRIPTION = """\
Ghost BatchNorm as a torch.fx graph pass. Each BatchNorm layer of a model is rewritten to
normalize every ghost batch of G samples with its own statistics, exactly as chunking the batch
would, in a constant number of vectorized operations.

commands:
  demo      trace torchvision resnet18, rewrite it, and check it against the chunked reference
  inspect   show which layers of a model are rewritten and which are skipped, and why
  bench     time training steps of a model with plain BatchNorm and with fxghost
  build     compile the CPU kernels now (otherwise the first CPU training step does)
"""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line and exit code 2, like argparse, but without the usage block.
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="fxghost",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fxghost {_version.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)

    sub.add_parser(
        "build",
        help="compile the CPU kernels ahead of time",
        description="Compile (or find in the cache) the C kernels and the C++ autograd op that "
        "the CPU backend runs, and say where they are. Without this, the first eager CPU "
        "training step compiles them (about half a minute, once per machine and version).",
    )

    demo = sub.add_parser("demo", help="rewrite resnet18 and check it against the reference")
    demo.add_argument("--ghost-batch-size", "-g", type=positive_int, default=32, metavar="G")
    demo.add_argument(
        "--batch-size",
        type=positive_int,
        default=96,
        metavar="N",
        help="training batch for the equivalence check (default 96: 3 ghost batches)",
    )

    inspect = sub.add_parser(
        "inspect",
        help="list the layers a model's rewrite touches",
        description="Trace MODEL, rewrite it, and print the table of rewritten and skipped layers.",
    )
    inspect.add_argument(
        "model",
        metavar="MODEL",
        help="package.module:NAME, where NAME is an nn.Module or a callable returning one "
        "(the current folder is searched first), a torchvision model name "
        "(resnet18, mobilenet_v3_small, ...) or a timm model name (resnet18d, ...), looked up in "
        "that order; torchvision:NAME or timm:NAME picks the source",
    )
    inspect.add_argument("--ghost-batch-size", "-g", type=positive_int, default=32, metavar="G")
    inspect.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="rewrite only these layers (qualified names or glob patterns)",
    )
    inspect.add_argument("--code", action="store_true", help="also print the generated code")

    bench = sub.add_parser(
        "bench",
        help="time a model's training step, plain vs fxghost",
        description=_userbench.DESCRIPTION,
        epilog=_userbench.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _userbench.add_arguments(bench)
    return parser


_SOURCES = ("torchvision", "timm")


def _model_names(source: str) -> list[str] | None:
    """The model names ``source`` knows, or None when it is not installed."""
    if source == "torchvision":
        import torchvision

        return list(torchvision.models.list_models())
    try:
        import timm
    except ImportError:
        return None
    return list(timm.list_models())


def _knows(source: str, name: str, names: list[str] | None) -> bool:
    if names is None:
        return False
    if source == "timm":
        import timm

        # Also a name with a pretrained tag (resnet18.a1_in1k), which list_models leaves out.
        return bool(timm.is_model(name))
    return name in names


@contextlib.contextmanager
def _no_downloads(what: str) -> Iterator[None]:
    """Refuse torch.hub's downloads (torchvision's and timm's weights go through it) while a
    model is built by name: inspect and bench only need the architecture, and a download would
    be slow, or a URLError traceback offline."""

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise ValueError(
            f"building {what} tried to download {url}; fxghost builds models by name with "
            "random weights and never downloads: build it in a package.module:callable of your "
            "own and pass that"
        )

    with mock.patch("torch.hub.download_url_to_file", refuse):
        yield


def _create(source: str, name: str) -> nn.Module:
    what = f"{source} model {name!r}"
    try:
        with _no_downloads(what):
            if source == "torchvision":
                import torchvision

                builder = torchvision.models.get_model_builder(name)
                accepted = signature(builder).parameters
                # weights=None alone still loads ImageNet weights into the backbone of
                # detection and segmentation models (and freezes its BatchNorm layers).
                no_weights = {k: None for k in ("weights", "weights_backbone") if k in accepted}
                return builder(**no_weights)
            import timm

            return timm.create_model(name, pretrained=False)
    except OSError as err:  # also URLError: a download that did not go through torch.hub
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"building {what} tried to read or download a file and failed ({first}); fxghost "
            "builds models by name with random weights and never downloads: build it in a "
            "package.module:callable of your own and pass that"
        ) from None


def _unknown(spec: str, known: dict[str, list[str] | None], *, module_attr: bool) -> ValueError:
    tried = ["package.module:callable (no ':' in it)"] if module_attr else []
    tried += [f"{source} model names" for source, names in known.items() if names is not None]
    said = ", ".join(tried[:-1]) + " and " + tried[-1] if len(tried) > 1 else tried[0]
    parts = [f"unknown model {spec!r}: tried {said}"]
    missing = [source for source, names in known.items() if names is None]
    if missing:
        parts.append(f"{' and '.join(missing)} not installed (pip install {' '.join(missing)})")
    candidates = sorted({n for names in known.values() if names for n in names})
    close = difflib.get_close_matches(spec, candidates, n=3)
    if close:
        parts.append(f"close matches: {', '.join(close)}")
    return ValueError("; ".join(parts))


def _load_model(spec: str) -> tuple[nn.Module, str | None]:
    """The model ``spec`` names, and a line saying where it came from (None for module:attr)."""
    source, sep, name = spec.partition(":")
    if sep and source in _SOURCES:
        names = _model_names(source)
        if names is None:
            raise ValueError(
                f"{spec!r} asks for a {source} model, but {source} is not installed: "
                f"pip install {source}"
            )
        if not _knows(source, name, names):
            raise _unknown(name, {source: names}, module_attr=False)
        return _checked(spec, _create(source, name)), f"{name}: {source} model"
    if sep:
        module_name, attr = source, name
        # The console script, unlike `python -m fxghost`, does not put the current folder on
        # sys.path, and a user's models.py usually lives there.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot load {spec!r}: {err}") from None
        if isinstance(obj, nn.Module):  # a model instance, used as it is
            return obj, None
        if not callable(obj):
            raise TypeError(
                f"{spec!r} is a value of type {type(obj).__name__}, not a model: name an "
                "nn.Module, or a class or function that returns one when called without arguments"
            )
        return _checked(spec, obj()), None
    known = {source: _model_names(source) for source in _SOURCES}
    found = [source for source in _SOURCES if _knows(source, spec, known[source])]
    if not found:
        raise _unknown(spec, known, module_attr=True)
    source, *others = found
    note = f"{spec}: {source} model"
    if others:
        note += f" ({others[0]} has one too: pass {others[0]}:{spec})"
    return _checked(spec, _create(source, spec)), note


def _checked(spec: str, model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _layer_nodes(gm: fx.GraphModule, layer: str) -> list[list[str]]:
    rows = []
    for node in gm.graph.nodes:
        info = node.meta.get("fxghost", {})
        if info.get("source_layer") == layer or (node.op == "call_module" and node.target == layer):
            target = node.target if isinstance(node.target, str) else repr(node.target)
            rows.append([node.op, node.name, target, ", ".join(map(str, node.args))])
    return rows


def demo(ghost_batch_size: int = 32, batch_size: int = 96) -> int:
    """Rewrite torchvision resnet18, show it, and check one training step against the reference."""
    import torchvision

    torch.manual_seed(0)
    # float64, so that the comparison shows the algebra: in float32 both implementations carry
    # ~1e-2 relative noise on a randomly initialized resnet's input gradient.
    model = torchvision.models.resnet18(weights=None).double()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), ghost_batch_size)
    gm = transform(model, ghost_batch_size)
    rep = report(gm)
    print(f"fxghost {_version.__version__}: resnet18, ghost_batch_size={ghost_batch_size}\n")
    print(rep.table())
    print(rep.summary(), "\n")

    layer = "layer1.0.bn1"
    traced = fx.symbolic_trace(model)
    headers = ["opcode", "name", "target", "args"]
    print(f"Before: {layer} is one call_module node")
    print(tabulate(_layer_nodes(traced, layer), headers=headers), "\n")
    print(f"After: {layer} is reshape -> normalize -> reshape")
    print(tabulate(_layer_nodes(gm, layer), headers=headers), "\n")  # type: ignore[arg-type]

    x = torch.randn(batch_size, 3, 64, 64, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    x_gm = x.clone().requires_grad_()
    y_ref, y_gm = reference(x_ref), gm(x_gm)
    y_ref.square().mean().backward()
    y_gm.square().mean().backward()
    ref: Any = reference  # module surgery: its layers are ChunkedGhostBatchNorm wrappers
    net: Any = model
    checks = [
        ("output", y_gm, y_ref),
        ("input gradient", x_gm.grad, x_ref.grad),
        ("conv1.weight gradient", net.conv1.weight.grad, ref.conv1.weight.grad),
        (
            "layer1.0.bn1.running_var",
            net.layer1[0].bn1.running_var,
            ref.layer1[0].bn1.bn.running_var,
        ),
    ]
    rows, ok = [], True
    for what, a, b in checks:
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
        good = torch.allclose(a, b, rtol=1e-9, atol=1e-12)
        ok &= good
        rows.append([what, f"{err:.1e}", "ok" if good else "MISMATCH"])
    nbt = int(net.layer1[0].bn1.num_batches_tracked)
    nbt_ref = int(ref.layer1[0].bn1.bn.num_batches_tracked)
    ok &= nbt == nbt_ref
    verdict = "ok" if nbt == nbt_ref else "MISMATCH"
    rows.append(["num_batches_tracked", f"{nbt} vs {nbt_ref}", verdict])
    print(f"One training step, batch {batch_size}, fxghost vs the chunked reference (float64):")
    print(tabulate(rows, headers=["quantity", "max rel. difference", "result"]))
    print("\nequivalent to the chunked reference" if ok else "\nNOT equivalent")
    return 0 if ok else 1


def inspect_model(spec: str, ghost_batch_size: int, only: Sequence[str] | None, code: bool) -> int:
    model, source = _load_model(spec)
    if source is not None:
        print(source)
    gm = transform(model, ghost_batch_size, only=only)
    rep = report(gm)
    print(rep.table())
    print(rep.summary())
    if code:
        print(gm.code)
    return 0


def build() -> int:
    """``fxghost build``: 0 when every CPU kernel is ready, 1 when one could not be built."""
    from .backends import cpu

    built = cpu.build_all()
    for what, path in built.items():
        print(f"{what}: {path if path is not None else 'not available (see the message above)'}")
    return 0 if all(p is not None for p in built.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = parser.parse_args(args_list)
    try:
        if args.command == "build":
            return build()
        if args.command == "demo":
            return demo(args.ghost_batch_size, args.batch_size)
        if args.command == "inspect":
            return inspect_model(args.model, args.ghost_batch_size, args.only, args.code)
        if args.command == "bench":
            return _userbench.run(args, _load_model)
    except TracingError as err:
        # Not a bad argument: the model does not trace. The hints are the useful part.
        sys.stderr.write(f"{err}\n")
        return 1
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f"fxghost: error: {first}\n")
        return 2
    parser.print_help()
    return 2
