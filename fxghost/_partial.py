"""Rewriting models that do not trace as a whole: the largest submodules that do trace."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import fx, nn

from ._pass import _full, _is_batchnorm_like, _layer_record, _Records, _rewrite
from ._select import LayerSelector, rule_for
from ._trace import TracingError, trace

__all__ = ["UntracedPart", "rewrite_traceable_parts"]


class UntracedPart:
    """A submodule left as Python code because tracing it failed, with where and why."""

    def __init__(self, name: str, error: TracingError) -> None:
        self.name = name or "(root)"
        self.location = error.location
        self.error = str(error).splitlines()[0]

    def __repr__(self) -> str:
        return f"UntracedPart({self.name!r}, {self.error!r}, at {self.location!r})"


def _has_candidates(module: nn.Module) -> bool:
    return any(rule_for(m) is not None for m in module.modules())


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing parameters, buffers and children, with its own registries,
    so that replacing a child does not touch the caller's model."""
    new = copy.copy(module)
    new._modules = dict(module._modules)  # type: ignore[assignment]
    new._parameters = dict(module._parameters)  # type: ignore[assignment]
    new._buffers = dict(module._buffers)  # type: ignore[assignment]
    return new


def rewrite_traceable_parts(
    model: nn.Module,
    g: int,
    selector: LayerSelector,
    make_tracer: Callable[[], fx.Tracer],
    concrete_args: dict[str, Any] | None,
    prefix: str = "",
) -> tuple[nn.Module, _Records, list[str], list[UntracedPart]]:
    """Trace and rewrite ``model``; where it does not trace, recurse into its children.

    Returns the rewritten module (a GraphModule, or a shallow copy of ``model`` whose traceable
    children are GraphModules), report entries, candidate layer names, and the untraced parts.
    """
    try:
        traced = trace(model, tracer=make_tracer(), concrete_args=concrete_args)
    except TracingError as err:
        untraced = [UntracedPart(prefix, err)]
        records = _Records()
        candidates: list[str] = []
        new = _shallow_copy(model)
        for child_name, child in model.named_children():
            full = _full(prefix, child_name)
            if not _has_candidates(child):
                continue
            if rule_for(child) is not None:
                # A BatchNorm called directly by untraceable code: nothing smaller to trace.
                candidates.append(full)
                records.add(_layer_record(
                    full, child, False,
                    f"called by untraceable {prefix or '(root)'}: {untraced[0].error}", None,
                ))
                continue
            sub, sub_records, sub_candidates, sub_untraced = rewrite_traceable_parts(
                child, g, selector, make_tracer, None, full
            )
            new._modules[child_name] = sub
            for record in sub_records.values():
                records.add(record)
            candidates += sub_candidates
            untraced += sub_untraced
        where = prefix or "(root)"
        for name, module in model.named_modules():
            full = _full(prefix, name)
            if name and full not in records and _is_batchnorm_like(module):
                records.add(_layer_record(
                    full, module, False, f"in untraceable code of {where}", None
                ))
        return new, records, candidates, untraced
    new_gm, records, candidates = _rewrite(traced, g, selector, model, prefix)
    return new_gm, records, candidates, []
