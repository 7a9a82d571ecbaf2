"""fxghost: ghost BatchNorm as a torch.fx graph pass.

>>> import torch, fxghost
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
>>> gm = fxghost.transform(model, ghost_batch_size=4)
>>> gm(torch.randn(10, 3, 8, 8)).shape      # ghost batches of 4, 4 and 2 samples
torch.Size([10, 8, 6, 6])
>>> int(model[1].num_batches_tracked)       # the original layer's statistics were updated
3
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import fx, nn

from ._pass import ghost_batchnorm_pass
from ._plan import check_ghost_batch_size
from ._report import GhostReport, LayerRecord, report
from ._trace import GhostTracer, TracingError, trace
from ._version import __version__

__all__ = [
    "GhostReport",
    "GhostTracer",
    "LayerRecord",
    "TracingError",
    "__version__",
    "ghost_batchnorm_pass",
    "report",
    "transform",
]


def transform(
    model: nn.Module,
    ghost_batch_size: int = 32,
    *,
    only: Iterable[str] | str | None = None,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    concrete_args: dict[str, Any] | None = None,
    tracer: fx.Tracer | None = None,
) -> fx.GraphModule:
    """Trace ``model`` and rewrite its ``nn.BatchNorm1d/2d/3d`` layers into ghost BatchNorm.

    Returns a new ``torch.fx.GraphModule`` that shares ``model``'s parameters and buffers (so an
    optimizer built on ``model.parameters()`` keeps working, and ``model`` ends up holding the
    trained weights and running statistics) and has the same ``state_dict`` keys. ``model`` itself
    is not modified. ``fxghost.report(gm)`` lists the layers rewritten and skipped.

    Args:
        model: the module to trace (a GraphModule is rewritten without re-tracing).
        ghost_batch_size: samples per ghost batch, a positive int.
        only: qualified layer names or glob patterns to rewrite (default: all).
        leaf_modules: module classes or qualified names to keep as black boxes while tracing.
        autowrap_functions: functions to record as single nodes instead of tracing into them.
        concrete_args: arguments of ``forward`` to fix while tracing (see ``torch.fx``).
        tracer: a ``torch.fx.Tracer`` to use instead of fxghost's.

    >>> import torch, fxghost
    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))
    >>> gm = fxghost.transform(model, ghost_batch_size=16)
    >>> sorted(gm.state_dict()) == sorted(model.state_dict())
    True
    """
    check_ghost_batch_size(ghost_batch_size)
    if isinstance(model, fx.GraphModule):
        traced = model
    else:
        if tracer is None:
            tracer = GhostTracer(leaf_modules, autowrap_functions)
        elif leaf_modules or autowrap_functions:
            raise ValueError(
                "fxghost: pass leaf_modules/autowrap_functions or a tracer, not both; "
                "configure the custom tracer instead"
            )
        traced = trace(model, tracer=tracer, concrete_args=concrete_args)
    return ghost_batchnorm_pass(traced, ghost_batch_size, only=only, root=model)
