"""The public entry points: ``transform`` (trace and rewrite a model) and ``ghost_batchnorm_pass``
(rewrite a GraphModule the user traced)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import fx, nn

from . import _distributed, backends
from ._plan import check_ghost_batch_size
from ._report import GhostReport, attach
from ._scope import Walk, rewrite_graph_module, rewrite_module
from ._select import LayerSelector
from ._trace import GhostTracer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "PartialRewriteWarning",
    "finish",
    "ghost_batchnorm_pass",
    "group_of",
    "transform",
]


class PartialRewriteWarning(UserWarning):
    """Some BatchNorm layers were not ghosted (or not wholly: their backward hooks); the
    warning counts them, and ``fxghost.report(result)`` says why for each."""


def _timm_rules(model: nn.Module) -> tuple[list[Any], list[Any]]:
    """timm's own tracer rules (as ``timm.layers._fx`` uses them) when the model has timm parts."""
    if not any(type(m).__module__.startswith("timm.") for m in model.modules()):
        return [], []
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm modules without an importable timm
        return [], []
    functions = [f for f in get_notrace_functions() if callable(f)]
    return list(get_notrace_modules()), functions


def transform(
    model: nn.Module,
    ghost_batch_size: int = 32,
    *,
    only: Iterable[str] | str | None = None,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    concrete_args: dict[str, Any] | None = None,
    tracer: fx.Tracer | None = None,
    strict: bool = False,
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
    fuse_epilogues: bool = True,
) -> nn.Module:
    """Trace ``model`` and rewrite its ``nn.BatchNorm1d/2d/3d`` layers into ghost BatchNorm.

    Returns a new ``torch.fx.GraphModule`` that shares ``model``'s parameters and buffers (so an
    optimizer built on ``model.parameters()`` keeps working, and ``model`` ends up holding the
    trained weights and running statistics) and has the same ``state_dict`` keys. ``model`` itself
    is not modified. ``fxghost.report(gm)`` lists the layers rewritten and skipped.

    Every BatchNorm that runs is ghosted, following the module tree: submodules that the graph
    keeps as black boxes (tracer leaves, modules passed to ``torch.utils.checkpoint``) are
    rewritten on their own, inside the same call. If ``model`` does not trace as a whole, it is
    kept as Python code (a copy of its module tree sharing all parameters and buffers) and its
    children are rewritten instead, down to a BatchNorm called by untraceable code, which
    becomes a GraphModule of its own with the layer's ``state_dict`` keys. ``strict=True``
    raises [`TracingError`][fxghost.TracingError] instead. Models using timm layers are traced
    with timm's own rules. A layer's forward hooks and pre-hooks still fire. A ReLU right after
    a layer, or a residual add then a ReLU (``relu(bn(x) + identity)``, as ResNet blocks end),
    becomes part of the layer's normalization call, with the same results
    (``fuse_epilogues``). One
    [`PartialRewriteWarning`][fxghost.PartialRewriteWarning] counts the layers that could not be
    ghosted (subclasses of BatchNorm not taught with
    [`fxghost.register_batchnorm`][fxghost.register_batchnorm], SyncBatchNorm, functional calls);
    ``fxghost.report(result)`` says why for each.

    Args:
        model: the module to trace (a GraphModule is rewritten without re-tracing).
        ghost_batch_size: samples per ghost batch, a positive int.
        only: qualified layer names or glob patterns to rewrite (default: all).
        leaf_modules: module classes or qualified names to keep as black boxes while tracing
            (their BatchNorms are still ghosted, each submodule on its own).
        autowrap_functions: functions to record as single nodes instead of tracing into them.
        concrete_args: arguments of ``forward`` to fix while tracing (see ``torch.fx``).
        tracer: a ``torch.fx.Tracer`` to use instead of fxghost's.
        strict: raise [`TracingError`][fxghost.TracingError] rather than rewrite only the
            traceable parts.
        backend: where each layer's calls run: ``"auto"`` (chosen per call, see
            ``fxghost.backends``), ``"torch"`` (plain torch ops, anywhere), ``"cpu"`` (the
            compiled C kernels) or ``"triton"``. ``fxghost.report(result)`` shows, after a
            call, which ran.
        process_group: a ``torch.distributed`` process group this process belongs to: each
            layer then forms its ghost batches from the group's batches concatenated in rank
            order, communicating per-channel statistics only (see the documentation's "Ghost
            batches across processes", docs/process-groups.md). ``None``: each process's own
            batch.
        fuse_epilogues: fuse into a layer's normalization the ReLU that is the only user of
            its output, or the residual add that is, when a ReLU is the add's only user (the
            ReLU an ``nn.ReLU`` without hooks, ``torch.relu``, ``F.relu`` or ``.relu()``; each
            in place or not), so that a kernel backend can run them in one kernel; with any
            ``nn.Identity`` modules without hooks that the graph calls in between (timm's
            ``drop_block``). A fused ``nn.ReLU`` or ``nn.Identity`` that has hooks by the time
            it runs is called, unfused, and they fire.
            ``False`` keeps those nodes as they are, to inspect the graph.

    Returns:
        The rewritten module: a ``torch.fx.GraphModule``, or, where ``model`` does not trace as
        a whole, a copy of its module tree with its parts rewritten. Its ``training`` flag is
        ``model``'s.

    Raises:
        ValueError: ``ghost_batch_size`` is not a positive int, ``backend`` is not one of the
            names above, ``tracer`` comes with ``leaf_modules`` or ``autowrap_functions``, a
            name or pattern of ``only`` matches no BatchNorm layer, ``backend`` is not
            ``"auto"`` with a ``process_group`` of several processes, or this process is not a
            member of ``process_group``.
        TypeError: ``leaf_modules`` or ``only`` hold something other than classes and names,
            ``process_group`` is not a ``torch.distributed.ProcessGroup``, or
            ``fuse_epilogues`` is not a bool.
        RuntimeError: ``backend`` names kernels that cannot run here (``"cpu"`` without a C
            compiler, ``"triton"`` without Triton and a CUDA device).
        fxghost.TracingError: with ``strict=True``, ``model`` or one of its submodules does not
            trace.

    Examples:
        >>> import torch, fxghost
        >>> model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))
        >>> gm = fxghost.transform(model, ghost_batch_size=16)
        >>> sorted(gm.state_dict()) == sorted(model.state_dict())
        True
    """
    g = check_ghost_batch_size(ghost_batch_size)
    backends.check(backend)
    fuse = _check_fuse_epilogues(fuse_epilogues)
    if isinstance(model, fx.GraphModule):
        return ghost_batchnorm_pass(
            model,
            g,
            only=only,
            backend=backend,
            process_group=process_group,
            fuse_epilogues=fuse,
        )
    if tracer is not None and (leaf_modules or autowrap_functions):
        raise ValueError(
            "fxghost: pass leaf_modules/autowrap_functions or a tracer, not both; "
            "configure the custom tracer instead"
        )
    timm_leaves, timm_functions = _timm_rules(model)
    leaves = [*leaf_modules, *timm_leaves]
    functions = [*autowrap_functions, *timm_functions]

    def make_tracer() -> fx.Tracer:
        return tracer if tracer is not None else GhostTracer(leaves, functions)

    walk = Walk(
        g,
        LayerSelector(only),
        make_tracer,
        strict=strict,
        backend=backend,
        process_group=group_of(process_group, backend),
        fuse_epilogues=fuse,
    )
    result = rewrite_module(model, walk, concrete_args=concrete_args)
    return finish(result, model, walk)


def ghost_batchnorm_pass(
    gm: fx.GraphModule,
    ghost_batch_size: int = 32,
    *,
    only: Iterable[str] | str | None = None,
    root: nn.Module | None = None,
    prefix: str = "",
    backend: str = "auto",
    process_group: ProcessGroup | None = None,
    fuse_epilogues: bool = True,
) -> fx.GraphModule:
    """Rewrite every ``call_module`` node of an exact ``nn.BatchNorm1d/2d/3d`` (or a class taught
    with [`fxghost.register_batchnorm`][fxghost.register_batchnorm]) in ``gm`` into ghost
    BatchNorm, and return a new GraphModule (``gm`` is left unchanged). Submodules that the graph
    calls as black boxes (tracer leaves) and that hold BatchNorms are rewritten on their own, as
    ``transform`` does.

    Use it on a GraphModule you traced yourself (custom tracer, leaf modules, ``concrete_args``)
    or between other FX passes.

    Args:
        gm: the GraphModule to rewrite.
        ghost_batch_size: samples per ghost batch, a positive int.
        only: narrows the rewrite to layers named by qualified name or glob pattern (default:
            all).
        root: the module whose parameters, buffers and submodules the result must mirror
            (default: ``gm``), so that ``state_dict`` keys stay the same.
        prefix: ``gm``'s qualified name inside a larger model, for layer names in reports,
            errors and ``only``.
        backend: as for [`transform`][fxghost.transform].
        process_group: as for [`transform`][fxghost.transform].
        fuse_epilogues: as for [`transform`][fxghost.transform]. A ``gm`` rewritten before
            keeps the epilogues fused then.

    Returns:
        A new GraphModule with ``gm``'s BatchNorm nodes rewritten.

    Raises:
        TypeError: ``gm`` is not a ``torch.fx.GraphModule``, ``only`` holds something other
            than names, ``process_group`` is not a ``torch.distributed.ProcessGroup``, or
            ``fuse_epilogues`` is not a bool.
        ValueError: ``ghost_batch_size`` is not a positive int, ``backend`` is not a backend's
            name, a name or pattern of ``only`` matches no BatchNorm layer, ``backend`` is not
            ``"auto"`` with a ``process_group`` of several processes, or this process is not a
            member of ``process_group``.
        RuntimeError: ``backend`` names kernels that cannot run here.

    Examples:
        >>> import torch, fxghost
        >>> traced = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
        >>> gm = fxghost.ghost_batchnorm_pass(traced, ghost_batch_size=8)
        >>> [n.name for n in gm.graph.nodes]
        ['input_1', '_0_layer', '_0_ghost_view', '_0_ghost_norm', '_0', 'output']
    """
    g = check_ghost_batch_size(ghost_batch_size)
    fuse = _check_fuse_epilogues(fuse_epilogues)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"fxghost: ghost_batchnorm_pass takes a torch.fx.GraphModule, got "
            f"{type(gm).__name__}; use fxghost.transform(model) to trace and rewrite a module"
        )
    walk = Walk(
        g,
        LayerSelector(only),
        GhostTracer,
        backend=backends.check(backend),
        process_group=group_of(process_group, backend),
        fuse_epilogues=fuse,
    )
    result = rewrite_graph_module(gm, walk, root, prefix)
    return finish(result, root if root is not None else gm, walk, stacklevel=3)


def _check_fuse_epilogues(fuse_epilogues: object) -> bool:
    if not isinstance(fuse_epilogues, bool):
        raise TypeError(
            f"fxghost: fuse_epilogues must be True or False, got {type(fuse_epilogues).__name__}"
        )
    return fuse_epilogues


def group_of(process_group: object, backend: str) -> tuple[int | None, int | None]:
    """``(key, size)`` of a ``process_group`` argument (:func:`fxghost._distributed.register`),
    checked against ``backend``: calls across processes run in torch ops and collectives."""
    key, size = _distributed.register(process_group)
    if key is not None and backend != "auto":
        raise ValueError(
            f"fxghost: backend={backend!r} normalizes one process's batch; ghost batches across "
            f"the {size} processes of process_group run in torch ops with collectives. Pass "
            "backend='auto' with process_group, or no process_group."
        )
    return key, size


def finish(result: Any, model: nn.Module, walk: Walk, stacklevel: int = 3) -> Any:
    """Check ``only``, attach the report (layers in the model's order) and warn, once, about
    the layers not ghosted."""
    walk.selector.check_all_matched(walk.candidates)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers = sorted(walk.records.values(), key=lambda r: order.get(r.name, len(order)))
    rep = GhostReport(ghost_batch_size=walk.g, layers=layers, untraced=walk.untraced)
    attach(result, rep)
    text = rep.warning(type(model).__name__)
    if text:
        warnings.warn(text, PartialRewriteWarning, stacklevel=stacklevel)
    return result
