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

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import fx, nn

from ._partial import UntracedPart, rewrite_traceable_parts
from ._pass import ghost_batchnorm_pass
from ._plan import check_ghost_batch_size
from ._report import GhostReport, LayerRecord, attach, report
from ._select import LayerSelector, register_batchnorm
from ._trace import GhostTracer, TracingError, trace
from ._version import __version__

__all__ = [
    "GhostReport",
    "GhostTracer",
    "LayerRecord",
    "PartialRewriteWarning",
    "TracingError",
    "UntracedPart",
    "__version__",
    "ghost_batchnorm_pass",
    "register_batchnorm",
    "report",
    "transform",
]


class PartialRewriteWarning(UserWarning):
    """The model did not trace as a whole; only its traceable submodules were rewritten."""


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
) -> nn.Module:
    """Trace ``model`` and rewrite its ``nn.BatchNorm1d/2d/3d`` layers into ghost BatchNorm.

    Returns a new ``torch.fx.GraphModule`` that shares ``model``'s parameters and buffers (so an
    optimizer built on ``model.parameters()`` keeps working, and ``model`` ends up holding the
    trained weights and running statistics) and has the same ``state_dict`` keys. ``model`` itself
    is not modified. ``fxghost.report(gm)`` lists the layers rewritten and skipped.

    If ``model`` does not trace as a whole, the largest submodules that do trace are rewritten
    instead: the result is then a copy of ``model``'s module tree (sharing all parameters and
    buffers) whose traceable children are GraphModules, a :class:`PartialRewriteWarning` says
    what was left and why, and the report lists it. ``strict=True`` raises
    :class:`TracingError` instead. Models using timm layers are traced with timm's own rules.

    Args:
        model: the module to trace (a GraphModule is rewritten without re-tracing).
        ghost_batch_size: samples per ghost batch, a positive int.
        only: qualified layer names or glob patterns to rewrite (default: all).
        leaf_modules: module classes or qualified names to keep as black boxes while tracing.
        autowrap_functions: functions to record as single nodes instead of tracing into them.
        concrete_args: arguments of ``forward`` to fix while tracing (see ``torch.fx``).
        tracer: a ``torch.fx.Tracer`` to use instead of fxghost's.
        strict: raise :class:`TracingError` rather than rewrite only the traceable parts.

    >>> import torch, fxghost
    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6))
    >>> gm = fxghost.transform(model, ghost_batch_size=16)
    >>> sorted(gm.state_dict()) == sorted(model.state_dict())
    True
    """
    g = check_ghost_batch_size(ghost_batch_size)
    if isinstance(model, fx.GraphModule):
        return ghost_batchnorm_pass(model, g, only=only)
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

    if strict:
        traced = trace(model, tracer=make_tracer(), concrete_args=concrete_args)
        return ghost_batchnorm_pass(traced, g, only=only, root=model)
    selector = LayerSelector(only)
    result, records, candidates, untraced = rewrite_traceable_parts(
        model, g, selector, make_tracer, concrete_args
    )
    selector.check_all_matched(candidates)
    attach(result, GhostReport(ghost_batch_size=g, layers=records.values(), untraced=untraced))
    if untraced:
        parts = "; ".join(
            f"{p.name} ({p.error}" + (f", at {p.location})" if p.location else ")")
            for p in untraced
        )
        warnings.warn(
            f"fxghost: {type(model).__name__} does not trace as a whole; rewrote its traceable "
            f"submodules and left as Python code: {parts}. fxghost.report(result) lists every "
            "layer; pass strict=True to get an error instead.",
            PartialRewriteWarning,
            stacklevel=2,
        )
    return result
