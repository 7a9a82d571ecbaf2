"""The graph pass on one graph: each ``call_module`` BatchNorm node becomes
ghost_view -> ghost_norm -> ghost_unview (between the layer's forward hooks, when it has any).
A ReLU after it, or a residual add then a ReLU, is fused into the ``ghost_norm`` call (its
``epilogue``), so that a kernel backend can run them in the normalization's kernel; pass-through
``nn.Identity`` calls in between (timm's ``drop_block``) are fused with them."""

from __future__ import annotations

import functools
import operator
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
    "FusedEpilogue",
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
# The ReLUs and adds an epilogue fuses (see _GraphRewrite.fusion).
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__")
#: The adds that write into their first operand.
_INPLACE_ADDS = (operator.iadd, "add_", "__iadd__")
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
    epilogue: str | None = None,
) -> LayerRecord:
    """The report entry of ``module``. ``warn``: whether ``transform``'s warning names it (by
    default: a layer with a ``reason``, except a frozen one, which has nothing to ghost).
    ``group_size``: the processes its ghost batches span (``process_group=``). ``epilogue``:
    what its normalization fuses (``"relu"``, ``"add_relu"``)."""
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
        epilogue=EPILOGUE_LABELS.get(epilogue or "", ""),
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
            # A layer called at several sites: each distinct epilogue, where they differ.
            kinds = ["" if e == "none" else e for e in old.epilogue.split(", ")]
            if record.epilogue not in kinds:
                kinds.append(record.epilogue)
            epilogue = kinds[0] if len(kinds) == 1 else ", ".join(e or "none" for e in kinds)
            self._by_name[record.name] = LayerRecord(
                **{**old.__dict__, "calls": old.calls + 1, "epilogue": epilogue}
            )

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
    processes of ``group``; with ``fuse_epilogues``, a ReLU after the layer, or a residual add
    then a ReLU, fused into its normalization (with any pass-through ``nn.Identity`` calls in
    between)."""

    g: int
    backend: str = "auto"
    group: GroupRef = NO_GROUP
    fuse_epilogues: bool = True


class FusedEpilogue(NamedTuple):
    """What a layer's ``ghost_norm`` node applies after normalizing, in place of the graph's
    ReLU (``kind="relu"``) or residual add and ReLU (``kind="add_relu"``), and of the
    pass-through ``nn.Identity`` calls around them."""

    #: ``"relu"`` or ``"add_relu"`` (:data:`fxghost.ops.EPILOGUES`).
    kind: str
    #: The add's other operand, a node of the new graph (``None`` for a ReLU alone).
    residual: fx.Node | None
    #: The targets of the ``nn.Identity`` modules the graph called, in call order: between the
    #: layer and the add (or, without one, the ReLU), and between the add and the ReLU.
    identities: tuple[tuple[str, ...], tuple[str, ...]]
    #: The target of the ``nn.ReLU`` module the graph called, or ``None`` (a function, a method).
    activation: str | None
    #: Whether the add was in place on the layer's output (``out += identity``).
    add_inplace: bool
    #: The names of the replaced nodes, in graph order: the ``nn.Identity`` calls, the add (with
    #: one) and the ReLU, whose name the subgraph's last node takes.
    fused: tuple[str, ...]
    #: The ReLU node's meta, which the subgraph's last node takes (it stands for the ReLU's
    #: output: its shape metadata, stack trace and the user's own keys).
    meta: dict[str, Any]


#: How the report shows each epilogue.
EPILOGUE_LABELS = {"relu": "relu", "add_relu": "add+relu"}


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


def after_submodules(module: nn.Module, rule: LayerRule) -> list[str]:
    """The submodules of ``module`` that its rule runs after the normalization, except those
    that are ``nn.Identity``."""
    return [sub for sub in rule.after if not isinstance(getattr(module, sub), nn.Identity)]


def emit_ghost_subgraph(
    graph: fx.Graph,
    x: Any,
    module: nn.Module,
    rule: LayerRule,
    site: GhostSite,
    settings: GhostSettings,
    epilogue: FusedEpilogue | None = None,
) -> fx.Node:
    """Emit view -> normalize -> unview (-> the rule's ``after`` submodules) for ``module`` at
    ``site``, between its forward pre-hooks and forward hooks when it has any.

    A ``backend`` other than ``"auto"`` is passed to the normalization node
    (``ghost_norm(..., backend="cpu")``), and a process group's key to the view and
    normalization nodes, as their ``process_group`` argument. With an ``epilogue`` (for a layer
    without hooks or ``after`` submodules), the normalization node applies it, and the last
    node takes the name of the last node it replaces.
    """
    name, base, g = site.name, site.base, settings.g
    info: dict[str, Any] = {
        "source_layer": name,
        "layer_type": type(module).__name__,
        "ghost_batch_size": g,
    }
    if epilogue is not None:
        info.update(epilogue=epilogue.kind, fused=list(epilogue.fused))
    after = after_submodules(module, rule)
    post_hooks = _has_hooks(module, "_forward_hooks")
    steps: list[str] = ["unview", *after, *(["hooks"] if post_hooks else [])]

    def make(
        op: str, tgt: Any, args: tuple[Any, ...], step: str, kwargs: dict[str, Any] | None = None
    ) -> fx.Node:
        ghost_step = step in ("pre_hooks", "view", "normalize", "unview", "hooks")
        suffix = "" if step == steps[-1] else f"_ghost_{step}" if ghost_step else f"_{step}"
        suffix = suffix.replace("_ghost_normalize", "_ghost_norm")
        node_name = f"{base}{suffix}"
        meta = site.meta
        if epilogue is not None and step == steps[-1]:
            node_name, meta = epilogue.fused[-1], epilogue.meta
        new = graph.create_node(op, tgt, args, kwargs or {}, name=node_name)
        new.meta = {**meta, "fxghost": {**info, "step": step}}
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
    if epilogue is not None:
        chosen["epilogue"] = epilogue.kind
        if epilogue.residual is not None:
            chosen["residual"] = epilogue.residual
        # The node holds the modules the epilogue stands for: the graph still reaches the
        # user's modules, and once one has hooks it calls them (ghost_norm's epilogue_steps).
        before_add, after_add = epilogue.identities
        calls: list[fx.Node | str] = [make("get_attr", t, (), "identity") for t in before_add]
        if epilogue.kind == "add_relu":
            calls.append("add")
        calls += [make("get_attr", t, (), "identity") for t in after_add]
        if epilogue.activation is not None:
            calls.append(make("get_attr", epilogue.activation, (), "activation"))
        else:
            calls.append("relu")
        if any(isinstance(call, fx.Node) for call in calls):
            chosen["epilogue_steps"] = tuple(calls)
        if epilogue.add_inplace:
            chosen["add_inplace"] = True
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
        # Fused epilogues: the add nodes where a layer's subgraph is emitted (the residual may
        # come after the layer in graph order), with what emits it; and the nodes replaced by a
        # subgraph emitted already, with its last node; and the nn.Identity calls before an add
        # whose subgraph comes later, which nothing in the new graph stands for.
        self.deferred: dict[fx.Node, Callable[[], fx.Node]] = {}
        self.replaced: dict[fx.Node, fx.Node] = {}
        self.absorbed: set[fx.Node] = set()

    def run(self, source: nn.Module) -> tuple[fx.Graph, Records, list[str], dict[str, str]]:
        """The new graph (linted), its records, candidates and opaque submodules; ``source`` is
        the module whose layers the records cover."""
        for node in self.old_graph.nodes:
            new = _HANDLERS[self.kind(node)](self, node)
            if new is not None:  # None: a layer whose subgraph comes later, at its add
                self.env[node] = new
        self.record_unreached(source)
        self.graph.lint()
        return self.graph, self.records, self.candidates, self.opaque

    def kind(self, node: fx.Node) -> str:
        if node in self.deferred or node in self.replaced or node in self.absorbed:
            return "fused"
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

    def batchnorm(self, node: fx.Node) -> fx.Node | None:
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
        fusion = self.fusion(node)
        g, size = self.settings.g, self.settings.group.size
        kind = None if fusion is None else fusion.kind
        self.records.add(layer_record(name, module, True, "", g, group_size=size, epilogue=kind))
        if fusion is None:
            return emit_ghost_subgraph(self.graph, x, module, rule, site, self.settings)
        emit = functools.partial(self.emit_fused, x, module, rule, site, fusion)
        if fusion.add is None:
            return emit()
        self.deferred[fusion.add] = emit
        self.absorbed.update(fusion.before)
        return None

    def emit_fused(
        self, x: fx.Node, module: nn.Module, rule: LayerRule, site: GhostSite, fusion: _Fusion
    ) -> fx.Node:
        """The ghost subgraph of a layer with the epilogue it fuses, the nodes after it that it
        replaces (its ReLU last) mapped to its last node."""
        residual = None if fusion.residual is None else self.env[fusion.residual]
        add = () if fusion.add is None else (fusion.add,)
        replaced = (*fusion.before, *add, *fusion.after, fusion.relu)
        epilogue = FusedEpilogue(
            fusion.kind,
            residual,
            (_targets(fusion.before), _targets(fusion.after)),
            fusion.activation,
            fusion.add_inplace,
            tuple(n.name for n in replaced),
            fusion.relu.meta,
        )
        out = emit_ghost_subgraph(self.graph, x, module, rule, site, self.settings, epilogue)
        # Those before the add were passed already (see absorbed); the add itself emitted this.
        for node in (*fusion.after, fusion.relu) if add else (*fusion.before, fusion.relu):
            self.replaced[node] = out
        return out

    def fused(self, node: fx.Node) -> fx.Node | None:
        """A node fused into a layer's normalization: the add emits the layer's subgraph; an
        ``nn.Identity`` call before the add stands for nothing; those after the layer's subgraph
        and the ReLU stand for its last node."""
        emit = self.deferred.pop(node, None)
        if emit is not None:
            return emit()
        if node in self.absorbed:
            self.absorbed.discard(node)
            return None
        return self.replaced.pop(node)

    def fusion(self, node: fx.Node) -> _Fusion | None:
        """The epilogue that the ``call_module`` node of a layer fuses, where the pass rewrites
        it: a ReLU its only user, or an add its only user whose only user is a ReLU (see
        :func:`_relu_of` and :func:`_add_of`), each possibly through a chain of pass-through
        ``nn.Identity`` calls (see :func:`_passes_through`). Nothing when fusion is off, the
        layer has hooks or ``after`` submodules; nor, for an add: when the layer is its second
        operand and the add is in place (it writes into the residual, which others may read) or
        the first operand fuses it; or when a node between the layer and the add (where its
        subgraph then goes) uses the layer."""
        if not self.settings.fuse_epilogues or node.op != "call_module" or len(node.users) != 1:
            return None
        module = self.gm.get_submodule(str(node.target))
        rule = rule_for(module)
        if (
            rule is None
            or not self.selector.selects(full_name(self.prefix, str(node.target)))
            or has_hooks(module)
            or after_submodules(module, rule)
        ):
            return None
        before, end, user = _through_identities(self.gm, node)
        if user is None:
            return None
        relu = _relu_of(self.gm, user, end)
        if relu is not None:
            return _Fusion(user, relu or None, None, None, False, before, ())
        operands = _add_of(user)
        if operands is None:
            return None
        first, second, inplace = operands
        if end is second and (
            inplace or self.fusion(_before_identities(self.gm, first)) is not None
        ):
            return None  # an in-place add writes into the residual; or the first one fuses
        after, add_end, last = _through_identities(self.gm, user)
        relu = None if last is None else _relu_of(self.gm, last, add_end)
        if last is None or relu is None or self.used_between(module, node, user, before):
            return None
        residual = second if end is first else first
        return _Fusion(last, relu or None, user, residual, inplace, before, after)

    def used_between(
        self, module: nn.Module, start: fx.Node, end: fx.Node, moved: tuple[fx.Node, ...]
    ) -> bool:
        """Whether a node after ``start`` and before ``end``, except the ``moved`` ones (which
        the fused call replaces), calls ``module`` or reads a module holding it: moving its
        call to ``end`` would change the order of its updates."""
        node = start.next
        while node is not end:
            if node in moved:
                node = node.next
                continue
            for used in (node, *node.all_input_nodes):
                if used.op in ("call_module", "get_attr"):
                    value = _attr(self.gm, str(used.target))
                    if isinstance(value, nn.Module) and any(m is module for m in value.modules()):
                        return True
            node = node.next
        return False

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
            if is_norm:
                # A fused epilogue's arguments stay.
                kept = {
                    k: v for k, v in new.kwargs.items() if k not in ("backend", "process_group")
                }
                new.kwargs = {**norm_kwargs(self.settings.backend, key), **kept}
            else:
                new.kwargs = group_kwarg(key)
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
            epilogue = cast("str | None", node.kwargs.get("epilogue"))
            self.records.add(
                layer_record(
                    name, layer, True, note, new_g, warn=False, group_size=size, epilogue=epilogue
                )
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


class _Fusion(NamedTuple):
    """What a layer's node fuses (:meth:`_GraphRewrite.fusion`): nodes of the old graph."""

    #: The ReLU node, the last one replaced.
    relu: fx.Node
    #: The ReLU module's target, or ``None`` (a function or method).
    activation: str | None
    #: The add node and its other operand, or ``None`` for a ReLU alone.
    add: fx.Node | None
    residual: fx.Node | None
    #: Whether the add writes into the layer's output.
    add_inplace: bool
    #: The pass-through ``nn.Identity`` calls between the layer and the add (or, without one,
    #: the ReLU), and between the add and the ReLU, in graph order.
    before: tuple[fx.Node, ...]
    after: tuple[fx.Node, ...]

    @property
    def kind(self) -> str:
        """The ``epilogue`` of ``ghost_norm``."""
        return "relu" if self.add is None else "add_relu"


def _relu_of(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> str | None:
    """When ``node`` is a ReLU of ``source`` alone: the target of its ``nn.ReLU`` module (with no
    hooks), or ``""`` for ``torch.relu``/``relu_``, ``F.relu`` or the ``relu``/``relu_``
    methods; else ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if type(module) is nn.ReLU and not has_hooks(module) and _only(node, source):
            return str(node.target)
        return None
    if node.op == "call_function" and node.target is F.relu:
        # F.relu(input, inplace=False): both in place or not read the same values.
        args, kwargs = node.args, dict(node.kwargs)
        inplace = args[1:] or [kwargs.pop("inplace", False)]
        source_arg = args[0] if args else kwargs.pop("input", None)
        fits = source_arg is source and not kwargs and len(inplace) == 1
        return "" if fits and isinstance(inplace[0], bool) else None
    if (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target in _RELU_METHODS
    ):
        return "" if _only(node, source) else None
    return None


def _only(node: fx.Node, source: fx.Node) -> bool:
    return node.args == (source,) and not node.kwargs


def _passes_through(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` calls, on ``source`` alone, an ``nn.Identity`` module (exactly, not a
    subclass, whose forward may do something) that has no hooks: it returns ``source`` itself,
    so an epilogue may stand for it."""
    if node.op != "call_module" or not _only(node, source):
        return False
    module = gm.get_submodule(str(node.target))
    return type(module) is nn.Identity and not has_hooks(module)


def _through_identities(
    gm: fx.GraphModule, source: fx.Node
) -> tuple[tuple[fx.Node, ...], fx.Node, fx.Node | None]:
    """Follow ``source``'s only user through pass-through ``nn.Identity`` calls (each the only
    user of the one before): ``(those calls, the last of them or source, its only user)``, the
    user ``None`` where a node on the way has several users or none."""
    chain: list[fx.Node] = []
    end = source
    while len(end.users) == 1:
        (user,) = end.users
        if not _passes_through(gm, user, end):
            return tuple(chain), end, user
        chain.append(user)
        end = user
    return tuple(chain), end, None


def _before_identities(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node that a chain of pass-through ``nn.Identity`` calls ending at ``node`` starts
    from (``node`` itself when it is no such call)."""
    while node.args and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        if len(source.users) != 1 or not _passes_through(gm, node, source):
            break
        node = source
    return node


def _targets(nodes: tuple[fx.Node, ...]) -> tuple[str, ...]:
    return tuple(str(n.target) for n in nodes)


def _add_of(node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """``(first, second, in_place)`` when ``node`` adds two distinct nodes without scaling."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    if not is_add or len(node.args) != 2:
        return None
    kwargs = dict(node.kwargs)
    alpha = kwargs.pop("alpha", 1)
    if kwargs or type(alpha) not in (int, float) or alpha != 1:
        return None
    first, second = node.args
    if not (isinstance(first, fx.Node) and isinstance(second, fx.Node)) or first is second:
        return None
    return first, second, node.target in _INPLACE_ADDS


#: Each node kind's handler (see :meth:`_GraphRewrite.kind`): the node standing for the old
#: one in the new graph (``None`` for a layer whose fused subgraph comes later).
_HANDLERS: dict[str, Callable[[_GraphRewrite, fx.Node], fx.Node | None]] = {
    "batchnorm": _GraphRewrite.batchnorm,
    "unsupported_batchnorm": _GraphRewrite.unsupported_batchnorm,
    "black_box": _GraphRewrite.black_box,
    "attribute": _GraphRewrite.attribute,
    "functional_batchnorm": _GraphRewrite.functional_batchnorm,
    "ghost_op": _GraphRewrite.ghost_op,
    "fused": _GraphRewrite.fused,
    "other": _GraphRewrite.other,
}


def _attr(gm: nn.Module, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value
