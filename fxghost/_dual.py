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
        # GraphModule pickles only the current code; keep both graphs by pickling their code
        # through two plain GraphModules over the same submodules.
        train_gm = fx.GraphModule(self, self.train_graph)
        eval_gm = fx.GraphModule(self, self.eval_graph)
        return (_rebuild, (train_gm, eval_gm, type(self).__name__, self.training, self.meta))


def _rebuild(
    train_gm: fx.GraphModule, eval_gm: fx.GraphModule, class_name: str, training: bool,
    meta: dict[str, Any],
) -> DualGraphModule:
    root = nn.Module()
    for source in (train_gm, eval_gm):
        for name, child in source.named_children():
            if not hasattr(root, name):
                root.add_module(name, child)
        for name, p in source.named_parameters(recurse=False):
            root.register_parameter(name, p)
        for name, b in source.named_buffers(recurse=False):
            root.register_buffer(name, b)
    dual = DualGraphModule(root, train_gm.graph, eval_gm.graph, class_name)
    dual.meta.update(meta)
    dual.train(training)
    return dual
