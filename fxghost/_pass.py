"""The graph pass on one graph: each ``call_module`` BatchNorm node becomes
ghost_view -> ghost_norm -> ghost_unview (between the layer's forward hooks, when it has any)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import _distributed, ops
from ._distributed import NO_GROUP, GroupRef
from ._graph_module import (
    SOURCE_ATTR,
    DualGraphModule,
    GhostGraphModule,
    LayerGraphModule,
    has_hooks,
    mode_graphs,
)
from ._report import LayerRecord
from ._select import LayerRule, LayerSelector, rule_for

__all__ = [
    "BACKWARD_HOOKS",
    "HOLDS_HOOKS",
    "KEPT_AS_PYTHON",
    "PASSED",
    "TRACER_LEAF",
    "Records",
    "GhostSettings",
    "GhostSite",
    "Rewrite",
    "emit_ghost_subgraph",
    "full_name",
    "group_kwarg",
    "holds_candidates",
    "is_batchnorm_like",
    "layer_record",
    "norm_kwargs",
    "rewrite",
    "skip_reason",
]

# Why a submodule of a graph is rewritten on its own (Rewrite.opaque's values): the first three
# are called as black boxes, so their own forward is kept as Python.
TRACER_LEAF = "a tracer leaf"
HOLDS_HOOKS = "it has hooks"
BACKWARD_HOOKS = "a BatchNorm with backward hooks"
PASSED = "passed as an argument"
KEPT_AS_PYTHON = (TRACER_LEAF, HOLDS_HOOKS)

_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm, torch.native_batch_norm)
#: The ops that take a rewritten layer as an argument.
GHOST_OPS = (ops.ghost_view, ops.ghost_norm, ops.ghost_pre_hooks, ops.ghost_hooks)


def is_batchnorm_like(module: nn.Module) -> bool:
    if isinstance(module, LayerGraphModule):  # ghosted already
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    # torchvision's FrozenBatchNorm2d and third-party norms are not _BatchNorm subclasses.
    return "BatchNorm" in type(module).__name__


def skip_reason(module: nn.Module) -> str:
    kind = type(module)
    if isinstance(module, nn.SyncBatchNorm):
        return (
            "SyncBatchNorm: plain BatchNorm over all the processes of its group, not a ghost "
            "BatchNorm; build the model without nn.SyncBatchNorm.convert_sync_batchnorm (and "
            "pass process_group= for ghost batches across processes), or keep it"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return "lazy BatchNorm not yet initialized: run one forward pass before transform"
    if "Frozen" in kind.__name__:
        return "frozen statistics: nothing to ghost"
    return (
        f"subclass {kind.__module__}.{kind.__qualname__} of BatchNorm, whose forward may "
        "differ: if it is BatchNorm's (then submodules), teach it with "
        "fxghost.register_batchnorm"
    )


def layer_record(
    name: str,
    module: nn.Module,
    rewritten: bool,
    reason: str,
    g: int | None,
    *,
    warn: bool | None = None,
    group_size: int | None = None,
) -> LayerRecord:
    """The report entry of ``module``. ``warn``: whether ``transform``'s warning names it (by
    default: a layer with a ``reason``, except a frozen one, which has nothing to ghost).
    ``group_size``: the processes its ghost batches span (``process_group=``)."""
    if warn is None:
        warn = bool(reason) and "Frozen" not in type(module).__name__
    return LayerRecord(
        name=name,
        kind=type(module).__name__,
        rewritten=rewritten,
        reason=reason,
        num_features=getattr(module, "num_features", None),
        ghost_batch_size=g,
        momentum=getattr(module, "momentum", None),
        warn=warn,
        layer=module if rewritten else None,
        group_size=group_size if rewritten else None,
    )


class Records:
    """Report entries keyed by layer, counting repeated calls of a shared layer."""

    def __init__(self) -> None:
        self._by_name: dict[str, LayerRecord] = {}

    def add(self, record: LayerRecord) -> None:
        old = self._by_name.get(record.name)
        if old is None:
            self._by_name[record.name] = record
        else:
            self._by_name[record.name] = LayerRecord(**{**old.__dict__, "calls": old.calls + 1})

    def replace(self, record: LayerRecord) -> None:
        """``record`` instead of any entry of the same layer (a part rewritten on its own)."""
        self._by_name[record.name] = record

    def update(self, other: Records) -> None:
        for record in other.values():
            self.replace(record)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def values(self) -> list[LayerRecord]:
        return list(self._by_name.values())


def _has_hooks(module: nn.Module, kind: str) -> bool:
    return bool(getattr(module, kind, None))


class GhostSettings(NamedTuple):
    """What the pass does to each layer it selects: ghost batches of ``g`` samples, normalized
    by ``backend`` (``"auto"``: chosen per call, :mod:`fxghost.backends`), spanning the
    processes of ``group``."""

    g: int
    backend: str = "auto"
    group: GroupRef = NO_GROUP


class GhostSite(NamedTuple):
    """Where a layer's ghost subgraph goes, and how its nodes reach the layer."""

    #: The layer's qualified name in the user's model (for errors and provenance).
    name: str
    #: The name of the node the subgraph replaces: the new nodes' names derive from it, and the
    #: last node takes it, so that downstream code reads the same.
    base: str
    #: The replaced node's meta, which every new node carries.
    meta: dict[str, Any]
    #: What the ghost ops read the layer from.
    layer_target: str
    #: The module whose forward hooks run (the user's layer).
    hooks_target: str
    #: The path of the layer's own submodules (its rule's ``after``).
    submodule_prefix: str

    @classmethod
    def of_node(cls, node: fx.Node, name: str) -> GhostSite:
        """The site of a ``call_module`` node: the graph reaches the layer at its target."""
        target = str(node.target)
        return cls(name, node.name, node.meta, target, target, f"{target}.")


def emit_ghost_subgraph(
    graph: fx.Graph,
    x: Any,
    module: nn.Module,
    rule: LayerRule,
    site: GhostSite,
    settings: GhostSettings,
) -> fx.Node:
    """Emit view -> normalize -> unview (-> the rule's ``after`` submodules) for ``module`` at
    ``site``, between its forward pre-hooks and forward hooks when it has any.

    A ``backend`` other than ``"auto"`` is passed to the normalization node
    (``ghost_norm(..., backend="cpu")``), and a process group's key to the view and
    normalization nodes, as their ``process_group`` argument.
    """
    name, base, g = site.name, site.base, settings.g
    info = {"source_layer": name, "layer_type": type(module).__name__, "ghost_batch_size": g}
    after = [sub for sub in rule.after if not isinstance(getattr(module, sub), nn.Identity)]
    post_hooks = _has_hooks(module, "_forward_hooks")
    steps: list[str] = ["unview", *after, *(["hooks"] if post_hooks else [])]

    def make(
        op: str, tgt: Any, args: tuple[Any, ...], step: str, kwargs: dict[str, Any] | None = None
    ) -> fx.Node:
        ghost_step = step in ("pre_hooks", "view", "normalize", "unview", "hooks")
        suffix = "" if step == steps[-1] else f"_ghost_{step}" if ghost_step else f"_{step}"
        suffix = suffix.replace("_ghost_normalize", "_ghost_norm")
        new = graph.create_node(op, tgt, args, kwargs or {}, name=f"{base}{suffix}")
        new.meta = {**site.meta, "fxghost": {**info, "step": step}}
        return new

    layer = make("get_attr", site.layer_target, (), "layer")
    hooks_owner = layer
    pre_hooks = _has_hooks(module, "_forward_pre_hooks")
    if site.hooks_target != site.layer_target and (post_hooks or pre_hooks):
        hooks_owner = make("get_attr", site.hooks_target, (), "hooks_owner")
    if pre_hooks:
        x = make("call_function", ops.ghost_pre_hooks, (x, hooks_owner, name), "pre_hooks")
    key = settings.group.key
    view = make("call_function", ops.ghost_view, (x, layer, g, name), "view", group_kwarg(key))
    chosen = norm_kwargs(settings.backend, key)
    norm = make("call_function", ops.ghost_norm, (view, layer, g, name), "normalize", chosen)
    out = make("call_function", ops.ghost_unview, (norm, name), "unview")
    for sub in after:
        out = make("call_module", f"{site.submodule_prefix}{sub}", (out,), sub)
    if post_hooks:
        out = make("call_function", ops.ghost_hooks, (out, x, hooks_owner, name), "hooks")
    return out


def group_kwarg(group_key: int | None) -> dict[str, Any]:
    """The keyword arguments of ``ghost_view`` for a process group's key (none without one):
    the ops' ``process_group`` argument is the key, never the group itself."""
    return {} if group_key is None else {"process_group": group_key}


def norm_kwargs(backend: str, group_key: int | None) -> dict[str, Any]:
    """The keyword arguments of ``ghost_norm``: a chosen backend and a process group's key."""
    return {**({} if backend == "auto" else {"backend": backend}), **group_kwarg(group_key)}


def _mirror_state(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` (a GraphModule built from ``source``) every parameter, buffer and submodule
    of ``source`` at the same path, with the same persistence.

    ``GraphModule`` copies only what the graph references, into fresh container modules, and
    registers copied buffers as persistent; without this, ``state_dict`` keys would differ from the
    original model's (unused layers, non-persistent buffers).
    """
    if source is target:
        return
    # state_dict metadata: loaders read the version the module was saved with.
    if target._version != source._version:
        target._version = source._version
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
    # The model's own submodules, not the empty containers GraphModule makes for the paths its
    # graph reads: `gm.layer1[0]` indexes, and `gm.train()` reaches every module of the model.
    # Where a part is rewritten on its own, the containers on its path are copied then.
    for cname, child in source.named_children():
        target._modules[cname] = child
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


def full_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


class Rewrite(NamedTuple):
    """One graph rewritten: the new GraphModule, its report entries, the candidate layer names
    (so that a caller rewriting several pieces can check ``only`` against all of them), and the
    submodules the graph uses as black boxes that hold BatchNorms (tracer leaves, and modules
    passed as arguments, e.g. to ``checkpoint``), by path, which the caller rewrites on their
    own."""

    gm: fx.GraphModule
    records: Records
    candidates: list[str]
    opaque: dict[str, str]


def rewrite(
    gm: fx.GraphModule,
    settings: GhostSettings,
    selector: LayerSelector,
    root: nn.Module | None,
    prefix: str,
) -> Rewrite:
    """The pass proper, on ``gm``'s graph (both graphs of a :class:`DualGraphModule`): the
    layers ``selector`` selects get ``settings``."""
    source = root if root is not None else gm
    train_graph, eval_graph = mode_graphs(gm)
    graph, records, candidates, opaque = _GraphRewrite(
        gm, train_graph, settings, selector, prefix
    ).run(source)
    name = gm.__class__.__name__
    if eval_graph is not None:
        other_graph, other_records, _, other_opaque = _GraphRewrite(
            gm, eval_graph, settings, selector, prefix
        ).run(source)
        for record in other_records.values():
            if record.name not in records:
                records.add(record)
        opaque.update(other_opaque)
        new_gm: fx.GraphModule = DualGraphModule(
            gm, graph, other_graph, class_name=name, training=gm.training
        )
    else:
        new_gm = GhostGraphModule(gm, graph, class_name=name)
    _mirror_state(source, new_gm)
    object.__setattr__(new_gm, SOURCE_ATTR, source)  # not a submodule: no state
    new_gm.meta.update(gm.meta)
    # Only the top-level flag: recursing would flip the caller's shared layers.
    new_gm.training = gm.training
    return Rewrite(new_gm, records, candidates, opaque)


def holds_candidates(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm to rewrite (or one rewritten before, to rewrite
    again)."""
    return any(rule_for(m) is not None or isinstance(m, LayerGraphModule) for m in module.modules())


class _GraphRewrite:
    """One graph rewritten node by node: :meth:`kind` names what a node is, and that kind's
    handler in :data:`_HANDLERS` returns the node standing for it in the new graph (a copy, or
    the last node of a ghost subgraph), recording what it found on the way."""

    def __init__(
        self,
        gm: fx.GraphModule,
        old_graph: fx.Graph,
        settings: GhostSettings,
        selector: LayerSelector,
        prefix: str,
    ) -> None:
        self.gm, self.old_graph, self.settings = gm, old_graph, settings
        self.selector, self.prefix = selector, prefix
        self.graph = fx.Graph(tracer_cls=old_graph._tracer_cls)
        self.graph._codegen = old_graph._codegen
        self.env: dict[fx.Node, fx.Node] = {}
        self.records = Records()
        self.candidates: list[str] = []
        self.opaque: dict[str, str] = {}
        # The BatchNorm-like layers the graph reaches (calls, or passes as an argument): the
        # others get a record saying the rewrite did not reach them.
        self.reached: set[str] = set()

    def run(self, source: nn.Module) -> tuple[fx.Graph, Records, list[str], dict[str, str]]:
        """The new graph (linted), its records, candidates and opaque submodules; ``source`` is
        the module whose layers the records cover."""
        for node in self.old_graph.nodes:
            self.env[node] = _HANDLERS[self.kind(node)](self, node)
        self.record_unreached(source)
        self.graph.lint()
        return self.graph, self.records, self.candidates, self.opaque

    def kind(self, node: fx.Node) -> str:
        if node.op == "call_module":
            module = self.gm.get_submodule(str(node.target))
            if rule_for(module) is not None:
                return "batchnorm"
            if is_batchnorm_like(module):
                return "unsupported_batchnorm"
            return "black_box" if holds_candidates(module) else "other"
        if node.op == "get_attr" and not all(u.target in GHOST_OPS for u in node.users):
            return "attribute"
        if node.op == "call_function" and node.target in _FUNCTIONAL_BN:
            return "functional_batchnorm"
        if node.op == "call_function" and node.target in (ops.ghost_view, ops.ghost_norm):
            return "ghost_op"
        return "other"

    def copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, self.env.__getitem__)

    def batchnorm(self, node: fx.Node) -> fx.Node:
        """A layer with a rewrite rule: its ghost subgraph, where selected."""
        target = str(node.target)
        module = self.gm.get_submodule(target)
        name = full_name(self.prefix, target)
        self.reached.add(target)
        self.candidates.append(name)
        if not self.selector.selects(name):
            reason = f"not selected by {self.selector.describe()}"
            self.records.add(layer_record(name, module, False, reason, None, warn=False))
            return self.copy(node)
        if module._backward_hooks or module._backward_pre_hooks:
            # Backward hooks need nn.Module.__call__: the layer is rewritten as a module of its
            # own that shares them (see _scope).
            self.opaque[target] = BACKWARD_HOOKS
            return self.copy(node)
        x = self.env[cast(fx.Node, node.args[0] if node.args else node.kwargs["input"])]
        rule = cast(LayerRule, rule_for(module))  # kind() found it
        site = GhostSite.of_node(node, name)
        out = emit_ghost_subgraph(self.graph, x, module, rule, site, self.settings)
        g, size = self.settings.g, self.settings.group.size
        self.records.add(layer_record(name, module, True, "", g, group_size=size))
        return out

    def unsupported_batchnorm(self, node: fx.Node) -> fx.Node:
        """A BatchNorm-like layer without a rewrite rule: kept, and reported with why."""
        target = str(node.target)
        module = self.gm.get_submodule(target)
        self.reached.add(target)
        name = full_name(self.prefix, target)
        self.records.add(layer_record(name, module, False, skip_reason(module), None))
        return self.copy(node)

    def black_box(self, node: fx.Node) -> fx.Node:
        """A submodule holding BatchNorms that the graph calls as a black box (a tracer leaf, a
        module with hooks): rewritten on its own by the caller."""
        module = self.gm.get_submodule(str(node.target))
        self.opaque[str(node.target)] = HOLDS_HOOKS if has_hooks(module) else TRACER_LEAF
        return self.copy(node)

    def attribute(self, node: fx.Node) -> fx.Node:
        """A submodule read as a value (passed as an argument, e.g. to ``checkpoint``): rewritten
        on its own by the caller when it holds BatchNorms."""
        target = str(node.target)
        value = _attr(self.gm, target)
        if isinstance(value, nn.Module) and holds_candidates(value):
            self.reached.add(target)
            self.opaque[target] = PASSED
        return self.copy(node)

    def functional_batchnorm(self, node: fx.Node) -> fx.Node:
        """A ``batch_norm`` function call: kept, and reported (no module owns its statistics)."""
        self.records.add(
            LayerRecord(
                name=full_name(self.prefix, node.name),
                kind=f"{getattr(node.target, '__name__', node.target)} call",
                rewritten=False,
                reason="functional batch_norm call: no module owns its statistics",
                warn=True,
            )
        )
        return self.copy(node)

    def ghost_op(self, node: fx.Node) -> fx.Node:
        """A ghost op of an earlier rewrite: kept, with this pass's settings where selected."""
        layer_node, old_g = cast(fx.Node, node.args[1]), cast(int, node.args[2])
        name = str(node.args[3])
        selected = self.selector.selects(name)
        new_g = self.settings.g if selected else old_g
        new = self.copy(node)
        new.args = (*new.args[:2], new_g, *new.args[3:])
        is_norm = node.target is ops.ghost_norm
        if selected:
            key = self.settings.group.key
            new.kwargs = norm_kwargs(self.settings.backend, key) if is_norm else group_kwarg(key)
        new.meta["fxghost"] = {**node.meta.get("fxghost", {}), "ghost_batch_size": new_g}
        if is_norm:
            layer_target = str(layer_node.target)
            self.candidates.append(name)
            self.reached.add(layer_target)
            note = "" if new_g == old_g else f"ghost_batch_size changed from {old_g}"
            size = (
                self.settings.group.size
                if selected
                else _distributed.size_of(cast("int | None", node.kwargs.get("process_group")))
            )
            layer = _attr(self.gm, layer_target)
            self.records.add(
                layer_record(name, layer, True, note, new_g, warn=False, group_size=size)
            )
        return new

    def other(self, node: fx.Node) -> fx.Node:
        return self.copy(node)

    def record_unreached(self, source: nn.Module) -> None:
        """Records for the BatchNorm-like layers of ``source`` that the graph does not reach
        (traced into, or unused), except inside the submodules rewritten on their own."""
        inside_opaque = tuple(f"{path}." for path in self.opaque)
        for name, module in source.named_modules():
            if name and name not in self.reached and is_batchnorm_like(module):
                full = full_name(self.prefix, name)
                if full in self.records or name.startswith(inside_opaque):
                    continue
                reason = "not called as a module in the traced graph (traced into, or unused)"
                warn: bool | None = False
                if rule_for(module) is None:
                    reason, warn = f"{skip_reason(module)}; also {reason}", None
                self.records.add(layer_record(full, module, False, reason, None, warn=warn))


#: Each node kind's handler (see :meth:`_GraphRewrite.kind`).
_HANDLERS: dict[str, Callable[[_GraphRewrite, fx.Node], fx.Node]] = {
    "batchnorm": _GraphRewrite.batchnorm,
    "unsupported_batchnorm": _GraphRewrite.unsupported_batchnorm,
    "black_box": _GraphRewrite.black_box,
    "attribute": _GraphRewrite.attribute,
    "functional_batchnorm": _GraphRewrite.functional_batchnorm,
    "ghost_op": _GraphRewrite.ghost_op,
    "other": _GraphRewrite.other,
}


def _attr(gm: nn.Module, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value
