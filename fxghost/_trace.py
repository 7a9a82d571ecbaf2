"""Symbolic tracing with leaf modules, autowrapped functions, and errors that say how to proceed."""

from __future__ import annotations

import contextlib
import fnmatch
import operator
import os
import re
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint
from torch import fx, nn
from torch.fx.graph_module import _copy_attr

from . import ops
from ._graph_module import TracedModule, has_hooks

__all__ = ["GhostTracer", "TracingError", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)
# Taken now: while tracing, the module attribute is FX's wrapper of it.
_CHECKPOINT = torch.utils.checkpoint.checkpoint


class TracingError(RuntimeError):
    """Symbolic tracing of the model failed; the message names the failing line and the ways out.

    Args:
        message: the error's text.
        location: where the model's own code failed, as
            ``"file:line, in function: source line"``, when known.

    Attributes:
        location: where the model's own code failed (``None`` when no frame outside torch and
            fxghost was found).
    """

    def __init__(self, message: str, location: str | None = None) -> None:
        super().__init__(message)
        self.location = location


class _InplaceProxy(fx.Proxy):
    """A Proxy that records augmented assignments (``out += identity``) as the in-place operators
    they are. ``fx.Proxy`` has no in-place magic methods, so Python falls back to
    ``out = out + identity``: a fresh activation for every residual add that the model itself
    computes in place (on CPU each one page-faults in new memory), and a changed meaning where the
    updated tensor is shared."""


def _inplace_method(op: Callable[[Any, Any], Any]) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


for _name in ("iadd", "isub", "imul", "itruediv"):
    setattr(_InplaceProxy, f"__{_name}__", _inplace_method(getattr(operator, _name)))


class GhostTracer(fx.Tracer):
    """``torch.fx.Tracer`` that also keeps the given module types or qualified names (glob patterns
    allowed) as leaves, called as black boxes.

    Every BatchNorm subclass is a leaf too: tracing into one would freeze its ``self.training``
    branch into the graph (eval would then silently use batch statistics), and its input checks
    branch on tensor shapes that tracing cannot follow. ``+=``, ``-=``, ``*=`` and ``/=`` stay
    in-place operators in the graph, as the model wrote them (plain FX makes them out-of-place).

    A module with hooks (forward, pre-, backward) is a leaf too, so that its hooks run at each
    call with real tensors.

    ``torch.utils.checkpoint.checkpoint(submodule, ...)`` stays a checkpoint call, with the
    submodule as its argument (a ``get_attr`` node): tracing through it would drop the
    recomputation, so the rewritten model would store every activation of the block. A checkpoint
    of anything but a submodule fails to trace, so that the module calling it is kept as Python
    code and rewritten below.

    Args:
        leaf_modules: module classes (subclasses included) or qualified names (glob patterns
            allowed) to keep as leaves.
        autowrap_functions: functions to record as single nodes instead of tracing into them.

    Attributes:
        leaf_types: the module classes kept as leaves.
        leaf_names: the qualified names and patterns kept as leaves.

    Raises:
        TypeError: ``leaf_modules`` holds something other than classes and names.

    Examples:
        >>> import torch, fxghost
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        >>> tracer = fxghost.GhostTracer(leaf_modules=["0"])
        >>> traced = torch.fx.GraphModule(model, tracer.trace(model))
        >>> gm = fxghost.ghost_batchnorm_pass(traced, ghost_batch_size=4, root=model)
        >>> fxghost.report(gm).rewritten_names
        ['1']
    """

    def __init__(
        self,
        leaf_modules: Iterable[type[nn.Module] | str] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
    ) -> None:
        super().__init__(autowrap_functions=(*autowrap_functions, _CHECKPOINT))
        # Also `torch.utils.checkpoint.checkpoint(...)` and `cp.checkpoint(...)`, looked up in the
        # module rather than in the caller's globals.
        self._autowrap_search.append(torch.utils.checkpoint)
        leaves = list(leaf_modules)
        self.leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self.leaf_names = [s for s in leaves if isinstance(s, str)]
        bad = [t for t in leaves if not isinstance(t, (type, str))]
        if bad:
            raise TypeError(
                f"fxghost: leaf_modules takes module classes or qualified names, got {bad!r}"
            )

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceProxy(node, self)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _checkpoint_internals_refuse_proxies():
            return super().trace(root, concrete_args)

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, *a: Any, **k: Any
    ) -> Any:
        if target is _CHECKPOINT:
            if not (args and isinstance(args[0], nn.Module)):
                what = args[0] if args else kwargs.get("function")
                raise TypeError(
                    f"torch.utils.checkpoint.checkpoint of {what!r}, which is not a submodule: "
                    "only checkpoint(self.submodule, ...) can stay a checkpoint call in a graph"
                )
            # fxghost's op, which stays one node when the graph is traced again: a node of
            # torch's function would be generated as wrap("torch.utils.checkpoint.checkpoint"),
            # which breaks every later symbolic trace in the process.
            target = ops.checkpoint
        return super().create_proxy(kind, target, args, kwargs, *a, **k)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        if has_hooks(m):
            # Called as a module, its hooks run as nn.Module.__call__ runs them, with real
            # tensors; traced into, they would run now, on proxies, and never again.
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self.leaf_names):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@contextlib.contextmanager
def _checkpoint_internals_refuse_proxies() -> Iterator[None]:
    """While tracing, make torch's checkpoint machinery refuse traced values: reached other than
    through the name ``checkpoint`` (a ``functools.partial`` stored on the module, as
    HuggingFace writes it, or an alias), it would be traced through silently, and the rewritten
    model would store every activation that the model meant to recompute. Refused, the module
    calling it is kept as Python code, and its checkpoint with it."""
    module = torch.utils.checkpoint
    saved = {
        name: module.__dict__[name] for name in _CHECKPOINT_INTERNALS if name in module.__dict__
    }

    def refusing(original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if _holds_proxy((args, kwargs)):
                raise TypeError(
                    "torch.utils.checkpoint reached with traced values other than as "
                    "checkpoint(self.submodule, ...) (through a functools.partial or an alias): "
                    "the module calling it is kept as Python code"
                )
            return original(*args, **kwargs)

        return call

    try:
        for name, original in saved.items():
            setattr(module, name, refusing(original))
        yield
    finally:
        for name, original in saved.items():
            setattr(module, name, original)


# What checkpoint() calls with the checkpointed function's arguments, in recent torch and in older.
_CHECKPOINT_INTERNALS = ("_checkpoint_impl", "_checkpoint_without_reentrant_generator")


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_proxy(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_proxy(v) for v in value.values())
    return False


def _user_frame(err: BaseException) -> str | None:
    """The innermost traceback frame outside torch: the model line tracing tripped on."""
    found = None
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename.startswith(_TORCH_DIR) or os.sep + "fxghost" + os.sep in frame.filename:
            continue
        found = f"{frame.filename}:{frame.lineno}, in {frame.name}: {(frame.line or '').strip()}"
    return found


def _same_program(a: fx.Graph, b: fx.Graph, root: nn.Module) -> bool:
    """Whether two traces compute the same thing. Tensor constants that forward creates (lifted
    as ``_tensor_constantN``) get a new name in each trace: they count as the same when their
    values are."""

    def canonical(graph: fx.Graph) -> tuple[str, list[Any]]:
        consts = [
            str(n.target)
            for n in graph.nodes
            if n.op == "get_attr" and str(n.target).startswith("_tensor_constant")
        ]
        src = graph.python_code("self").src
        # Longest names first, so that _tensor_constant1 never rewrites part of _tensor_constant12.
        for i, target in sorted(enumerate(consts), key=lambda item: -len(item[1])):
            src = re.sub(rf"\b{target}\b", f"__fxghost_constant_{i}__", src)
        return src, [getattr(root, t) for t in consts]

    (src_a, consts_a), (src_b, consts_b) = canonical(a), canonical(b)
    return src_a == src_b and all(
        type(x) is type(y)
        and (
            x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))
            if isinstance(x, torch.Tensor)
            else x == y
        )
        for x, y in zip(consts_a, consts_b, strict=True)
    )


def trace(
    model: nn.Module,
    *,
    tracer: fx.Tracer | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Symbolically trace ``model``; on failure raise :class:`TracingError` with hints."""
    tracer = tracer if tracer is not None else GhostTracer()
    flags = [(m, m.training) for m in model.modules()]
    attrs_before = set(model.__dict__)
    try:
        # Trace in both modes: a forward that branches on self.training outside BatchNorm
        # (F.dropout(training=self.training), auxiliary heads) differs between them.
        model.train()
        train_graph = tracer.trace(model, concrete_args)
        model.eval()
        eval_graph = tracer.trace(model, concrete_args)
    except Exception as err:
        for key in set(model.__dict__) - attrs_before:  # tensor constants of a partial trace
            del model.__dict__[key]
        where = _user_frame(err)
        raise TracingError(
            f"fxghost could not symbolically trace {type(model).__name__}: "
            f"{type(err).__name__}: {err}\n"
            + (f"  at {where}\n" if where else "")
            + "How to proceed:\n"
            "  - mark the submodule containing that line as a leaf: "
            "fxghost.transform(model, leaf_modules=[TheSubmoduleClass or 'its.qualified.name']) "
            "(BatchNorm layers inside a leaf are not rewritten);\n"
            "  - for a Python branch on an argument, fix it with concrete_args={'arg': value};\n"
            "  - for a function that does data-dependent work, pass autowrap_functions=[fn];\n"
            "  - or trace the model yourself and call fxghost.ghost_batchnorm_pass(graph_module).",
            location=where,
        ) from err
    finally:
        for m, training in flags:  # never leave the caller's modes changed
            m.training = training
    gm = TracedModule(tracer.root, train_graph, model.__class__.__name__)
    if not _same_program(train_graph, eval_graph, tracer.root):
        for node in eval_graph.nodes:
            if node.op in ("get_attr", "call_module"):
                _copy_attr(tracer.root, gm, str(node.target))
        gm.eval_graph = eval_graph
    gm.training = model.training
    # The tracer stores tensor constants of forward on the root
    # (setattr(root, "_tensor_constantN"));
    # the GraphModule now holds its own references, so take them off the caller's model.
    for key in set(model.__dict__) - attrs_before:
        del model.__dict__[key]
    return gm
