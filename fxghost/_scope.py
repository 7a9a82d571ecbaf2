"""Which parts of a model are rewritten, following the module tree.

A model that traces is rewritten as one graph. Below it, every submodule that the graph uses as a
black box and that holds BatchNorms (a tracer leaf, or a module passed as an argument, as to
``checkpoint``) is rewritten on its own. A module that does not trace is kept as Python code, and
its children are rewritten instead, down to a BatchNorm called directly by untraceable code, which
becomes a :class:`~fxghost._graph_module.LayerGraphModule` of its own. So every BatchNorm that
runs is ghosted, and the model's own Python (its checkpointing, its data-dependent code) is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

from torch import fx, nn

from . import ops
from ._distributed import NO_GROUP, GroupRef
from ._graph_module import LayerGraphModule, layer_graph_module, share_hooks, shared_mode_copy
from ._pass import (
    KEPT_AS_PYTHON,
    GhostSettings,
    GhostSite,
    Records,
    emit_ghost_subgraph,
    full_name,
    holds_candidates,
    is_batchnorm_like,
    layer_record,
    rewrite,
    skip_reason,
)
from ._select import LayerRule, LayerSelector, rule_for
from ._trace import TracingError, trace

__all__ = ["UntracedPart", "Walk", "rewrite_graph_module", "rewrite_module"]


class UntracedPart:
    """A submodule kept as Python code (its children rewritten instead), with why: it does not
    trace (``error`` and ``location`` say where), or it is a tracer leaf.

    Args:
        name: the submodule's qualified name (``""`` for the root).
        error: the :class:`fxghost.TracingError` that its trace raised, or why it was not traced.

    Attributes:
        name: the submodule's qualified name, ``"(root)"`` for the model itself.
        location: where the model's own code failed (``"file:line, in function: source line"``),
            or ``None``.
        error: the first line of the error or reason.
    """

    def __init__(self, name: str, error: TracingError | str) -> None:
        self.name = name or "(root)"
        self.location = error.location if isinstance(error, TracingError) else None
        self.error = str(error).splitlines()[0]

    def __repr__(self) -> str:
        return f"UntracedPart({self.name!r}, {self.error!r}, at {self.location!r})"


@dataclass
class Walk:
    """What a rewrite of a model found, over all its parts."""

    g: int
    selector: LayerSelector
    make_tracer: Callable[[], fx.Tracer]
    strict: bool = False
    backend: str = "auto"
    #: ``(key, size)`` of the process group ghost batches span, from
    #: :func:`fxghost._distributed.register`; kept as :attr:`group`.
    process_group: InitVar[tuple[int | None, int | None]] = NO_GROUP
    #: Whether the pass fuses a ReLU, or a residual add and a ReLU, after a layer into its
    #: normalization (:class:`~fxghost._pass.GhostSettings`).
    fuse_epilogues: bool = True
    records: Records = field(default_factory=Records)
    candidates: list[str] = field(default_factory=list)
    untraced: list[UntracedPart] = field(default_factory=list)
    group: GroupRef = field(init=False)

    def __post_init__(self, process_group: tuple[int | None, int | None]) -> None:
        self.group = GroupRef(*process_group)

    @property
    def settings(self) -> GhostSettings:
        """What the pass does to each layer it selects."""
        return GhostSettings(self.g, self.backend, self.group, self.fuse_epilogues)


def rewrite_module(
    module: nn.Module,
    walk: Walk,
    prefix: str = "",
    concrete_args: dict[str, Any] | None = None,
    *,
    kept: str = "",
) -> nn.Module:
    """``module`` rewritten: a GraphModule where it traces (unless ``kept`` says why its own
    forward is kept: a tracer leaf, or a module with hooks), else a copy whose children are
    rewritten; ``module`` itself is left unchanged. The result runs ``module``'s hooks."""
    if isinstance(module, LayerGraphModule):  # rewritten before: again, from the same layer
        layer = module._fxghost_source
        return _rewrite_layer(layer, rule_for(layer) or LayerRule(), walk, prefix, module)
    rule = rule_for(module)
    if rule is not None:
        return _rewrite_layer(module, rule, walk, prefix)
    if kept:
        walk.untraced.append(UntracedPart(prefix, kept))
    else:
        try:
            traced = trace(module, tracer=walk.make_tracer(), concrete_args=concrete_args)
        except TracingError as err:
            if walk.strict:
                raise
            walk.untraced.append(UntracedPart(prefix, err))
        else:
            result = rewrite_graph_module(traced, walk, module, prefix)
            share_hooks(module, result)
            return result
    new = shared_mode_copy(module)
    for child_name, child in module.named_children():
        if holds_candidates(child):
            new._modules[child_name] = rewrite_module(child, walk, full_name(prefix, child_name))
    for name, sub in module.named_modules():
        full = full_name(prefix, name)
        if name and full not in walk.records and is_batchnorm_like(sub):
            walk.records.replace(layer_record(full, sub, False, skip_reason(sub), None))
    return new


def rewrite_graph_module(
    gm: fx.GraphModule, walk: Walk, root: nn.Module | None, prefix: str
) -> fx.GraphModule:
    """The pass on ``gm`` (traced from ``root``, whose state the result mirrors), then each
    black-box submodule of its graph that holds BatchNorms, rewritten on its own."""
    result = rewrite(gm, walk.settings, walk.selector, root, prefix)
    walk.records.update(result.records)
    walk.candidates += result.candidates
    source = root if root is not None else gm
    for path, why in result.opaque.items():
        sub = source.get_submodule(path)
        new_sub = rewrite_module(
            sub, walk, full_name(prefix, path), kept=why if why in KEPT_AS_PYTHON else ""
        )
        _set_submodule(result.gm, path, new_sub, source)
    return result.gm


def _set_submodule(root: nn.Module, path: str, new: nn.Module, source: nn.Module) -> None:
    """Put ``new`` at ``path`` in ``root``, copying on the way any container that is still the
    caller's own object (``source``'s), so that the caller's model is left unchanged."""
    *parents, attr = path.split(".")
    parent, walked = root, ""
    for atom in parents:
        walked = full_name(walked, atom)
        child = parent._modules[atom]
        if child is source.get_submodule(walked):
            child = parent._modules[atom] = shared_mode_copy(child)
        parent = child  # type: ignore[assignment]
    parent._modules[attr] = new


def _rewrite_layer(
    module: nn.Module,
    rule: LayerRule,
    walk: Walk,
    prefix: str,
    before: LayerGraphModule | None = None,
) -> nn.Module:
    """A BatchNorm called by code that does not trace (or the model itself), as a
    :class:`LayerGraphModule`: its graph is the same subgraph a traced model gets. ``before``:
    the LayerGraphModule of an earlier rewrite of it, whose state the new one takes."""
    walk.candidates.append(prefix)
    name = prefix or type(module).__name__
    old_g = None if before is None else _ghost_size(before)
    if not walk.selector.selects(prefix):
        if before is not None:
            walk.records.replace(layer_record(name, module, True, "", old_g, warn=False))
            return before
        reason = f"not selected by {walk.selector.describe()}"
        walk.records.replace(layer_record(name, module, False, reason, None, warn=False))
        return module
    graph = fx.Graph()
    x = graph.placeholder("input")
    base = prefix.rpartition(".")[2] or "bn"
    # The LayerGraphModule holds the layer as _fxghost_self, the user's layer (whose hooks run)
    # as _fxghost_source, and the layer's submodules at its root.
    site = GhostSite(
        name,
        base,
        meta={},
        layer_target="_fxghost_self",
        hooks_target="_fxghost_source",
        submodule_prefix="",
    )
    out = emit_ghost_subgraph(graph, x, module, rule, site, walk.settings)
    graph.output(out)
    note = ""
    if old_g is not None and old_g != walk.g:
        note = f"ghost_batch_size changed from {old_g}"
    gm = layer_graph_module(
        module, graph, f"Ghost{type(module).__name__}", state=module if before is None else before
    )
    # Its graph runs the layer's forward hooks and pre-hooks as ops; backward hooks need
    # nn.Module.__call__ to wrap the call, so this module shares them.
    share_hooks(module, gm, backward_only=True)
    record = layer_record(
        name,
        module,
        True,
        note,
        walk.g,
        warn=False,
        group_size=walk.group.size,
    )
    walk.records.replace(dataclasses.replace(record, layer=gm))  # the ops' layer
    return gm


def _ghost_size(gm: fx.GraphModule) -> int:
    return next(n.args[2] for n in gm.graph.nodes if n.target is ops.ghost_norm)  # type: ignore[no-any-return]
