"""The GraphModules that fxghost returns.

:class:`GhostGraphModule` is a ``torch.fx.GraphModule`` that copies and pickles as the module it
is. ``GraphModule`` rebuilds itself from its graph on ``copy.deepcopy`` and on unpickling, and
keeps only what that graph references: submodules the graph does not call, non-persistent
buffers, the model's ``_version`` (which ``state_dict`` metadata carries, and which loaders such
as torchvision's MNASNet read) and fxghost's report would be lost.

:class:`DualGraphModule` holds one graph per mode, for models whose forward branches on
``self.training``: symbolic tracing reads ``self.training`` as a Python bool, so a model whose
own forward does ``F.dropout(x, p, training=self.training)`` or ``if self.training: ...`` would
keep its trace-time branch in both modes. As torchvision's feature extraction does, such a model
is traced in train mode and in eval mode, and ``train()``/``eval()`` swap the graph. When both
traces give the same code (most models), a plain :class:`GhostGraphModule` is used instead.

:class:`LayerGraphModule` is one BatchNorm ghosted on its own, for a BatchNorm called by code
that does not trace (or passed to ``fxghost.transform`` by itself): its parameters, buffers and
state-dict keys are the layer's own.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _copy_attr, _forward_from_src

__all__ = [
    "HOOK_REGISTRIES",
    "SOURCE_ATTR",
    "DualGraphModule",
    "GhostGraphModule",
    "LayerGraphModule",
    "SharedMode",
    "TracedModule",
    "has_hooks",
    "is_transform_result",
    "layer_graph_module",
    "mode_graphs",
    "share_hooks",
    "shared_mode_copy",
]

#: The attribute naming the user's module that a rewritten module stands for (not a submodule:
#: it adds no state).
SOURCE_ATTR = "_fxghost_source"

# What a GraphModule's class calls as ``_wrapped_call(self, *args, **kwargs)``: the module call.
_PLAIN_CALL = staticmethod(nn.Module.__call__)


def _get_training(self: nn.Module) -> bool:
    source = self.__dict__.get(SOURCE_ATTR)
    if source is not None:
        return bool(source.training)
    return bool(self.__dict__.get("_fxghost_training", True))


def _set_training(self: nn.Module, mode: bool) -> None:
    source = self.__dict__.get(SOURCE_ATTR)
    if source is not None:
        source.training = mode
    else:  # while the module is built, before it has a source
        self.__dict__["_fxghost_training"] = mode


class SharedMode:
    """Mixed into the modules fxghost builds to stand for a user's module (the GraphModules
    ``transform`` returns, and the copies of modules kept as Python): their ``training`` flag *is*
    the user's module's, read and written through. So ``model.eval()`` and ``gm.eval()`` are one
    switch: neither can leave the other in another mode, and a ``self.training`` branch in the
    model's code follows whichever was called."""

    training = property(_get_training, _set_training)


#: A module's hook registries, as ``nn.Module.__call__`` reads them.
HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
_BACKWARD_REGISTRIES = ("_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks that ``nn.Module.__call__`` runs."""
    return any(getattr(module, r, None) for r in HOOK_REGISTRIES)


def share_hooks(source: nn.Module, target: nn.Module, *, backward_only: bool = False) -> None:
    """Make ``target`` run ``source``'s hooks when called: the same registries, so a hook
    registered or removed on either is on both."""
    names = _BACKWARD_REGISTRIES if backward_only else (*HOOK_REGISTRIES, "_is_full_backward_hook")
    for registry in names:
        if registry in source.__dict__:
            target.__dict__[registry] = source.__dict__[registry]


class TracedModule(fx.GraphModule):
    """What fxghost's trace hands to the pass: the traced graph (and ``eval_graph``, the
    eval-mode graph, where the model's forward branches on ``self.training``) over the model's
    attributes. Its code is never generated: the pass builds the module that runs, so a
    transform generates each graph's code once (FX keeps every generated source for the life of
    the process)."""

    eval_graph: fx.Graph | None = None

    def recompile(self) -> Any:
        return None


def mode_graphs(gm: fx.GraphModule) -> tuple[fx.Graph, fx.Graph | None]:
    """``gm``'s training-mode graph, and its eval-mode graph where it has another."""
    if isinstance(gm, DualGraphModule):
        return gm.train_graph, gm.eval_graph
    if isinstance(gm, TracedModule):
        return gm.graph, gm.eval_graph
    return gm.graph, None


def is_transform_result(module: nn.Module) -> bool:
    """Whether ``module`` was built by ``fxghost.transform`` to stand for a user's module."""
    return SOURCE_ATTR in module.__dict__


@functools.cache
def _shared_mode_class(cls: type[nn.Module]) -> type[nn.Module]:
    # Same name, module and qualified name as the user's class: reprs, error messages and
    # isinstance checks read as before.
    return type(
        cls.__name__,
        (SharedMode, cls),
        {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__reduce_ex__": _reduce,
            "_fxghost_base": cls,
        },
    )


def _reduce(self: nn.Module, protocol: int) -> Any:
    # The class is made at run time, so copies and pickles name the user's class and re-make it.
    base = type(self)._fxghost_base  # type: ignore[attr-defined]
    return (_new_shared_mode, (base,), dict(self.__dict__))


def _new_shared_mode(base: type[nn.Module]) -> nn.Module:
    return object.__new__(_shared_mode_class(base))  # type: ignore[arg-type,no-any-return]


def shared_mode_copy(module: nn.Module) -> nn.Module:
    """A new module standing for ``module``: an instance of its class (with :class:`SharedMode`
    mixed in) sharing its parameters, buffers, children, hooks and mode, with registries of its
    own, so that replacing a child of the copy leaves ``module`` unchanged."""
    source = module.__dict__.get(SOURCE_ATTR, module)
    new = _new_shared_mode(getattr(type(module), "_fxghost_base", type(module)))
    new.__dict__.update(module.__dict__)
    new.__dict__.pop("training", None)
    new.__dict__[SOURCE_ATTR] = source
    new._modules = dict(module._modules)  # type: ignore[assignment]
    new._parameters = dict(module._parameters)  # type: ignore[assignment]
    new._buffers = dict(module._buffers)  # type: ignore[assignment]
    return new


class GhostGraphModule(SharedMode, fx.GraphModule):
    """A GraphModule whose copies (``copy.deepcopy``, pickling) keep every attribute: all
    submodules, parameters and buffers in the model's order, buffer persistence, ``_version``,
    state-dict hooks and fxghost's report.

    Data attributes it does not have (``num_classes``, ``config``, a ``resolution`` that the
    model's own Python reads off a submodule) are read from the module it was traced from
    (``_fxghost_source``). Methods are not: the source's methods would run its plain forward.
    """

    #: Whether methods, too, are read from the source (a LayerGraphModule's layer's are).
    _source_methods = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            source = self.__dict__.get(SOURCE_ATTR)
            if source is None or name.startswith("__"):
                raise
            value = getattr(source, name)
            if not self._source_methods and callable(value) and not isinstance(value, nn.Module):
                raise AttributeError(
                    f"fxghost: {type(source).__name__}.{name} is a method of the traced module; "
                    "the rewritten GraphModule has only forward (call the method on the "
                    "original model, which runs plain BatchNorm)"
                ) from None
            return value

    def recompile(self) -> Any:
        code = super().recompile()
        # GraphModule calls go through fx's wrapper, whose error handler walks the traceback with
        # a generator; under torch.compile(fullgraph=True) dynamo (2.8 and newer) refuses that
        # generator's frame, and a runtime error from the compiled code (a process group's batch
        # below the ghost size) surfaces as "Attempt to trace generator" instead of itself. The
        # plain module call raises errors as they are; the traceback still shows the generated
        # line (fx registers the source with linecache).
        type(self)._wrapped_call = _PLAIN_CALL  # type: ignore[attr-defined]
        return code

    def _graphs(self) -> dict[str, fx.Graph]:
        return {"_graph": self.graph}

    def _restore_graphs(self, graphs: dict[str, fx.Graph]) -> None:
        self.graph = graphs["_graph"]  # sets the owner and recompiles

    def _code_root(self) -> nn.Module:
        """What the graphs' code is pickled with: the attributes its nodes read."""
        return self

    def _state(self) -> dict[str, Any]:
        graphs = self._graphs()
        return {k: v for k, v in self.__dict__.items() if k not in graphs}

    def __deepcopy__(self, memo: dict[int, Any]) -> GhostGraphModule:
        res = type(self).__new__(type(self))  # a fresh per-instance class, as GraphModule's
        memo[id(self)] = res
        res.__dict__.update(copy.deepcopy(self._state(), memo))
        res._restore_graphs({k: copy.deepcopy(g, memo) for k, g in self._graphs().items()})
        return res

    def __reduce__(self) -> Any:
        # Graphs are not picklable: each travels as the code of a plain GraphModule (as
        # GraphModule pickles itself), and the __dict__ restores this module exactly. Copies:
        # a GraphModule takes ownership of the graph it is given.
        root = self._code_root()
        graphs = {k: fx.GraphModule(root, copy.deepcopy(g)) for k, g in self._graphs().items()}
        return (_rebuild, (type(self).__mro__[1], type(self).__name__, self._state(), graphs))


def _rebuild(
    cls: type[GhostGraphModule],
    class_name: str,
    state: dict[str, Any],
    graphs: dict[str, fx.GraphModule],
) -> GhostGraphModule:
    res = cls.__new__(cls)
    type(res).__name__ = class_name
    res.__dict__.update(state)
    res._restore_graphs({k: gm.graph for k, gm in graphs.items()})
    return res


class DualGraphModule(GhostGraphModule):
    """``train_graph`` runs in training mode, ``eval_graph`` in eval mode; they share every
    submodule, parameter and buffer, so there is one ``state_dict``.

    ``forward`` chooses the graph at each call from ``training`` (the user's model's flag, see
    :class:`SharedMode`), so ``model.eval()`` switches it as ``gm.eval()`` does. ``graph`` and
    ``code`` show the graph of the mode last set through ``train()``/``eval()`` (at first,
    ``training``'s).
    """

    def __init__(
        self,
        root: nn.Module,
        train_graph: fx.Graph,
        eval_graph: fx.Graph,
        class_name: str = "GraphModule",
        *,
        training: bool = True,
    ) -> None:
        super().__init__(root, train_graph, class_name)
        for node in eval_graph.nodes:
            if node.op in ("get_attr", "call_module"):
                _copy_attr(root, self, str(node.target))
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self._mode_graph_is_train = training
        self.graph = train_graph if training else eval_graph  # generates both forwards

    def recompile(self) -> Any:
        train_graph, eval_graph = self.__dict__.get("train_graph"), self.__dict__.get("eval_graph")
        if train_graph is None or eval_graph is None:
            # Inside __init__: the code is generated once both graphs are known (FX keeps every
            # generated source for the life of the process).
            return None
        code = super().recompile()
        cls = type(self)
        shown = cls.forward
        other_graph = eval_graph if self._graph is train_graph else train_graph
        other_code = other_graph.python_code(root_module="self")
        other = _forward_from_src(other_code.src, other_code.globals, {})
        train_fn, eval_fn = (shown, other) if self._graph is train_graph else (other, shown)

        @functools.wraps(shown)
        def forward(self: DualGraphModule, *args: Any, **kwargs: Any) -> Any:
            return (train_fn if self.training else eval_fn)(self, *args, **kwargs)

        cls.forward = forward  # type: ignore[method-assign]
        return code

    def train(self, mode: bool = True) -> DualGraphModule:
        # Swap what graph/code show (and recompile) only when the mode changes.
        if mode != self._mode_graph_is_train:
            self._mode_graph_is_train = mode
            self.graph = self.train_graph if mode else self.eval_graph
        return super().train(mode)  # type: ignore[return-value]

    def _graphs(self) -> dict[str, fx.Graph]:
        return {
            "_graph": self.graph,
            "train_graph": self.train_graph,
            "eval_graph": self.eval_graph,
        }

    def _restore_graphs(self, graphs: dict[str, fx.Graph]) -> None:
        self.train_graph, self.eval_graph = graphs["train_graph"], graphs["eval_graph"]
        self.graph = self.train_graph if self._mode_graph_is_train else self.eval_graph


class LayerGraphModule(GhostGraphModule):
    """One BatchNorm, ghosted on its own. The layer's parameters, buffers and submodules are this
    module's own (the same tensors, so ``state_dict`` keys and ``named_parameters`` are the
    layer's), and the graph passes this module to the ghost ops as the layer. Attributes and
    methods it does not have (``momentum``, ``eps``, ``num_features``, ``_check_input_dim``) are
    read from the original layer, its ``_fxghost_source``, so that changing them on the layer
    takes effect as it would in a model traced whole."""

    _source_methods = True

    @property
    def _fxghost_self(self) -> LayerGraphModule:
        # What the graph's get_attr node reads: FX cannot otherwise pass the module itself.
        return self

    def _code_root(self) -> nn.Module:
        # Not self: the graph's code reads self as _fxghost_self, and a carrier holding this
        # module would pickle it, and so itself, again.
        root = nn.Module()
        root._modules.update(self._modules)
        root._fxghost_self = nn.Module()
        root._fxghost_source = nn.Module()
        return root


def layer_graph_module(
    layer: nn.Module, graph: fx.Graph, class_name: str, state: nn.Module | None = None
) -> LayerGraphModule:
    """A :class:`LayerGraphModule` for ``layer`` running ``graph`` (whose nodes name this module
    ``_fxghost_self`` and the layer's submodules by their own names), holding the parameters,
    buffers and submodules of ``state`` (default: ``layer``'s own)."""
    state = layer if state is None else state
    gm = LayerGraphModule(nn.Module(), fx.Graph(), class_name)
    object.__setattr__(gm, SOURCE_ATTR, layer)  # not a submodule: no state of its own
    gm._parameters.update(state._parameters)
    gm._buffers.update(state._buffers)
    gm._non_persistent_buffers_set.update(state._non_persistent_buffers_set)
    gm._modules.update(state._modules)
    if layer._version != gm._version:
        gm._version = layer._version
    gm.training = state.training
    gm.graph = graph
    graph.lint()
    return gm
