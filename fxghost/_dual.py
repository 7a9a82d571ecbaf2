"""A GraphModule with one graph per mode, for models whose forward branches on ``self.training``.

Symbolic tracing reads ``self.training`` as a Python bool, so a model whose own forward does
``F.dropout(x, p, training=self.training)`` or ``if self.training: ...`` would keep its
trace-time branch in both modes. As torchvision's feature extraction does, such a model is traced
in train mode and in eval mode, and ``train()``/``eval()`` swap the graph. When both traces give
the same code (most models), a plain GraphModule is used instead.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _copy_attr

__all__ = ["DualGraphModule"]


class DualGraphModule(fx.GraphModule):
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

    def __deepcopy__(self, memo: dict[int, Any]) -> DualGraphModule:
        res = super().__deepcopy__(memo)
        res.train_graph = copy.deepcopy(self.train_graph, memo)
        res.eval_graph = copy.deepcopy(self.eval_graph, memo)
        res._mode_graph_is_train = self._mode_graph_is_train
        res.graph = res.train_graph if self._mode_graph_is_train else res.eval_graph
        return res  # type: ignore[no-any-return]

    def __reduce__(self) -> Any:
        # GraphModule pickles its __dict__ and the current graph's code, and rebuilds by
        # re-tracing that code. Here both graphs travel as the code of two plain GraphModules,
        # and the __dict__ itself (every submodule, parameter and buffer in the model's order,
        # buffer persistence, the report) restores this module exactly: a GraphModule rebuilt
        # from a graph alone would keep only what that graph references.
        state = {k: v for k, v in self.__dict__.items() if k not in _GRAPH_ATTRS}
        graphs = (fx.GraphModule(self, self.train_graph), fx.GraphModule(self, self.eval_graph))
        return (_rebuild, (state, graphs, self._mode_graph_is_train, type(self).__name__))


# Graphs are not picklable: they are rebuilt from code.
_GRAPH_ATTRS = ("_graph", "train_graph", "eval_graph")


def _rebuild(
    state: dict[str, Any],
    graphs: tuple[fx.GraphModule, fx.GraphModule],
    train_mode: bool,
    class_name: str,
) -> DualGraphModule:
    dual = DualGraphModule.__new__(DualGraphModule)  # a fresh per-instance class, as usual
    type(dual).__name__ = class_name
    dual.__dict__.update(state)
    dual.train_graph, dual.eval_graph = graphs[0].graph, graphs[1].graph
    dual._mode_graph_is_train = train_mode
    dual.graph = dual.train_graph if train_mode else dual.eval_graph  # sets the owner, recompiles
    return dual
