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
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _copy_attr

__all__ = ["DualGraphModule", "GhostGraphModule", "LayerGraphModule"]


class GhostGraphModule(fx.GraphModule):
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
            source = self.__dict__.get("_fxghost_source")
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
    submodule, parameter and buffer, so there is one ``state_dict``."""

    def __init__(
        self,
        root: nn.Module,
        train_graph: fx.Graph,
        eval_graph: fx.Graph,
        class_name: str = "GraphModule",
    ) -> None:
        super().__init__(root, train_graph, class_name)
        for node in eval_graph.nodes:
            if node.op in ("get_attr", "call_module"):
                _copy_attr(root, self, str(node.target))
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self._mode_graph_is_train = True

    def train(self, mode: bool = True) -> DualGraphModule:
        # Swap (and recompile) only when the mode changes.
        if mode != self._mode_graph_is_train:
            self.graph = self.train_graph if mode else self.eval_graph
            self._mode_graph_is_train = mode
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
    object.__setattr__(gm, "_fxghost_source", layer)  # not a submodule: no state of its own
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
