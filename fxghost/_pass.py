"""The graph pass: each ``call_module`` BatchNorm node becomes
ghost_view -> ghost_norm -> ghost_unview."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops
from ._dual import DualGraphModule
from ._plan import check_ghost_batch_size
from ._report import GhostReport, LayerRecord, attach
from ._select import LayerRule, LayerSelector, rule_for

__all__ = ["ghost_batchnorm_pass"]

_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm, torch.native_batch_norm)
_GHOST_OPS = (ops.ghost_view, ops.ghost_norm, ops.ghost_unview)


def _is_batchnorm_like(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    # torchvision's FrozenBatchNorm2d and third-party norms are not _BatchNorm subclasses.
    return "BatchNorm" in type(module).__name__


def _skip_reason(module: nn.Module) -> str:
    kind = type(module)
    if isinstance(module, nn.SyncBatchNorm):
        return (
            "SyncBatchNorm: its statistics span processes, ghost batches are per process; "
            "convert with nn.SyncBatchNorm.revert or keep it"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "lazy BatchNorm not yet initialized: run one forward pass before transform"
    if "Frozen" in kind.__name__:
        return "frozen statistics: nothing to ghost"
    return (
        f"subclass {kind.__module__}.{kind.__qualname__} of BatchNorm: its forward may differ, "
        "so it is left as is"
    )


def _layer_record(
    name: str, module: nn.Module, rewritten: bool, reason: str, g: int | None
) -> LayerRecord:
    return LayerRecord(
        name=name,
        kind=type(module).__name__,
        rewritten=rewritten,
        reason=reason,
        num_features=getattr(module, "num_features", None),
        ghost_batch_size=g,
        momentum=getattr(module, "momentum", None),
    )


class _Records:
    """Report entries keyed by layer, counting repeated calls of a shared layer."""

    def __init__(self) -> None:
        self._by_name: dict[str, LayerRecord] = {}

    def add(self, record: LayerRecord) -> None:
        old = self._by_name.get(record.name)
        if old is None:
            self._by_name[record.name] = record
        else:
            self._by_name[record.name] = LayerRecord(**{**old.__dict__, "calls": old.calls + 1})

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def values(self) -> list[LayerRecord]:
        return list(self._by_name.values())


def _emit_ghost_subgraph(
    graph: fx.Graph, node: fx.Node, x: Any, module: nn.Module, rule: LayerRule, g: int, name: str
) -> fx.Node:
    """Emit view -> normalize -> unview (-> the rule's ``after`` submodules) for ``node``.

    ``name`` is the layer's qualified name in the user's model (for errors and provenance); the
    node names derive from the original node's, and the last node takes it over, so downstream
    code reads the same.
    """
    base = node.name
    target = str(node.target)
    info = {"source_layer": name, "layer_type": type(module).__name__, "ghost_batch_size": g}
    after = [sub for sub in rule.after if not isinstance(getattr(module, sub), nn.Identity)]

    def make(op: str, tgt: Any, args: tuple[Any, ...], suffix: str, step: str) -> fx.Node:
        new = graph.create_node(op, tgt, args, {}, name=f"{base}{suffix}")
        new.meta = {**node.meta, "fxghost": {**info, "step": step}}
        return new

    layer = make("get_attr", target, (), "_layer", "layer")
    view = make("call_function", ops.ghost_view, (x, layer, g, name), "_ghost_view", "view")
    norm = make("call_function", ops.ghost_norm, (view, layer, g, name), "_ghost_norm", "normalize")
    out = make(
        "call_function", ops.ghost_unview, (norm, name), "_ghost_unview" if after else "", "unview"
    )
    for i, sub in enumerate(after):
        last = i == len(after) - 1
        out = make("call_module", f"{target}.{sub}", (out,), "" if last else f"_{sub}", sub)
    return out


def _mirror_state(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a GraphModule built from ``source``) every parameter, buffer and submodule
    of ``source`` at the same path, with the same persistence.

    ``GraphModule`` copies only what the graph references, into fresh container modules, and
    registers copied buffers as persistent; without this, ``state_dict`` keys would differ from the
    original model's (unused layers, non-persistent buffers).
    """
    if source is target:
        return
    for pname, param in source.named_parameters(recurse=False):
        if target._parameters.get(pname) is not param:
            target.register_parameter(pname, param)
    for bname, buf in source.named_buffers(recurse=False):
        persistent = bname not in source._non_persistent_buffers_set
        if target._buffers.get(bname) is not buf:
            target.register_buffer(bname, buf, persistent=persistent)
        elif not persistent:
            target._non_persistent_buffers_set.add(bname)
    for bname in target._buffers:
        # Tensor constants that tracing lifted out of forward (_tensor_constantN): state of the
        # graph, not of the model, so they stay out of state_dict.
        if bname not in source._buffers:
            target._non_persistent_buffers_set.add(bname)
    for cname, child in source.named_children():
        existing = target._modules.get(cname)
        if existing is None:
            target.add_module(cname, child)
        elif existing is not child:
            existing.training = child.training
            _mirror_state(child, existing)
    # The model's order, so that parameters() and state_dict() enumerate as the model's do (an
    # optimizer's state_dict maps parameters by position).
    for registry, reference in (
        ("_parameters", source._parameters),
        ("_buffers", source._buffers),
        ("_modules", source._modules),
    ):
        current = getattr(target, registry)
        ordered = {k: current[k] for k in reference if k in current}
        ordered.update((k, v) for k, v in current.items() if k not in ordered)
        current.clear()
        current.update(ordered)


def ghost_batchnorm_pass(
    gm: fx.GraphModule,
    ghost_batch_size: int = 32,
    *,
    only: Iterable[str] | str | None = None,
    root: nn.Module | None = None,
    prefix: str = "",
) -> fx.GraphModule:
    """Rewrite every ``call_module`` node of an exact ``nn.BatchNorm1d/2d/3d`` (or a class taught
    with :func:`fxghost.register_batchnorm`) in ``gm`` into ghost BatchNorm, and return a new
    GraphModule (``gm`` is left unchanged).

    Use it on a GraphModule you traced yourself (custom tracer, leaf modules, ``concrete_args``)
    or between other FX passes. ``only`` narrows the rewrite to layers named by qualified name or
    glob pattern. ``root`` is the module whose parameters, buffers and submodules the result must
    mirror (default: ``gm``), so that ``state_dict`` keys stay the same. ``prefix`` is ``gm``'s
    qualified name inside a larger model, for layer names in reports, errors and ``only``.

    >>> import torch, fxghost
    >>> traced = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    >>> gm = fxghost.ghost_batchnorm_pass(traced, ghost_batch_size=8)
    >>> [n.name for n in gm.graph.nodes]
    ['input_1', '_0_layer', '_0_ghost_view', '_0_ghost_norm', '_0', 'output']
    """
    g = check_ghost_batch_size(ghost_batch_size)
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(
            f"fxghost: ghost_batchnorm_pass takes a torch.fx.GraphModule, got "
            f"{type(gm).__name__}; use fxghost.transform(model) to trace and rewrite a module"
        )
    selector = LayerSelector(only)
    new_gm, records, candidates = _rewrite(gm, g, selector, root, prefix)
    selector.check_all_matched(candidates)
    attach(new_gm, GhostReport(ghost_batch_size=g, layers=records.values()))
    return new_gm


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def _rewrite(
    gm: fx.GraphModule,
    g: int,
    selector: LayerSelector,
    root: nn.Module | None,
    prefix: str,
) -> tuple[fx.GraphModule, _Records, list[str]]:
    """The pass proper; returns the new GraphModule, its report entries and the candidate names
    (so that a caller rewriting several pieces can check ``only`` against all of them)."""
    source = root if root is not None else gm
    graph, records, candidates = _rewrite_graph(gm, gm.graph, g, selector, source, prefix)
    if isinstance(gm, DualGraphModule):
        other = gm.eval_graph if gm.graph is gm.train_graph else gm.train_graph
        other_graph, other_records, _ = _rewrite_graph(gm, other, g, selector, source, prefix)
        for record in other_records.values():
            if record.name not in records:
                records.add(record)
        train_graph, eval_graph = (
            (graph, other_graph) if gm.graph is gm.train_graph else (other_graph, graph)
        )
        new_gm: fx.GraphModule = DualGraphModule(
            gm, train_graph, eval_graph, class_name=gm.__class__.__name__
        )
    else:
        new_gm = fx.GraphModule(gm, graph, class_name=gm.__class__.__name__)
    _mirror_state(source, new_gm)
    new_gm.meta.update(gm.meta)
    new_gm.recompile()
    # Only the top-level flag (and graph): recursing would flip the caller's shared layers.
    if isinstance(new_gm, DualGraphModule) and not gm.training:
        new_gm.graph = new_gm.eval_graph
        new_gm._mode_graph_is_train = False
    new_gm.training = gm.training
    return new_gm, records, candidates


def _rewrite_graph(
    gm: fx.GraphModule,
    old_graph: fx.Graph,
    g: int,
    selector: LayerSelector,
    source: nn.Module,
    prefix: str,
) -> tuple[fx.Graph, _Records, list[str]]:
    records = _Records()
    candidates: list[str] = []
    graph = fx.Graph(tracer_cls=old_graph._tracer_cls)
    graph._codegen = old_graph._codegen
    env: dict[fx.Node, fx.Node] = {}
    called: set[str] = set()

    for node in old_graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        rule = rule_for(module) if module is not None else None
        if module is not None:
            called.add(str(node.target))
        if module is not None and rule is not None:
            name = _full(prefix, str(node.target))
            candidates.append(name)
            if selector.selects(name):
                x = env[node.args[0]] if node.args else env[node.kwargs["input"]]
                env[node] = _emit_ghost_subgraph(graph, node, x, module, rule, g, name)
                records.add(_layer_record(name, module, True, "", g))
                continue
            reason = f"not selected by {selector.describe()}"
            records.add(_layer_record(name, module, False, reason, None))
        elif module is not None and _is_batchnorm_like(module):
            name = _full(prefix, str(node.target))
            records.add(_layer_record(name, module, False, _skip_reason(module), None))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_BN:
            records.add(
                LayerRecord(
                    name=_full(prefix, node.name),
                    kind=f"{getattr(node.target, '__name__', node.target)} call",
                    rewritten=False,
                    reason="functional batch_norm call: no module owns its statistics",
                )
            )
        elif node.op == "call_function" and node.target is ops.ghost_norm:
            layer_node = node.args[1]
            info = node.meta.get("fxghost", {})
            called.add(str(layer_node.target))  # type: ignore[union-attr]
            records.add(
                _layer_record(
                    str(node.args[3]),
                    gm.get_submodule(layer_node.target),  # type: ignore[union-attr,arg-type]
                    False,
                    f"already rewritten (ghost_batch_size={info.get('ghost_batch_size')})",
                    None,
                )
            )
        env[node] = graph.node_copy(node, lambda n: env[n])

    for name, module in source.named_modules():
        if name and name not in called and _is_batchnorm_like(module):
            full = _full(prefix, name)
            if full in records:
                continue
            reason = (
                "not called as a module in the traced graph (inside a leaf module, "
                "traced into, or unused)"
            )
            if rule_for(module) is None:
                reason = f"{_skip_reason(module)}; also {reason}"
            records.add(_layer_record(full, module, False, reason, None))

    graph.lint()
    return graph, records, candidates
