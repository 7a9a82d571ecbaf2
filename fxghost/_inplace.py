"""The in-place API: ghost BatchNorm under a model that a framework holds on to.

``transform`` returns a new module, which is right for a plain loop and for ``torch.compile``. A
training framework, though, keeps *its* object (a ``LightningModule``, a ``ComposerModel``, a
``PreTrainedModel``) and calls its methods and its submodules; it cannot be handed a GraphModule
instead. So :func:`apply_ghost_batchnorm` changes no module of ``model``'s tree: it gives each
BatchNorm object its ghost forward (an instance attribute, as ``functools.partial`` over
:func:`ghost_forward`, which is how ``torch.compile`` expects a patched forward), and
:func:`revert_ghost_batchnorm` takes it away.

Every module keeps its type, its place and its identity, so aliases held by user code stay live,
containers index and iterate as before, and hooks of every kind (on the BatchNorm itself, on a
block, backward hooks included) run through ``nn.Module.__call__`` as they always did. The model's
own Python (``self.training`` branches, activation checkpointing, data-dependent code) runs
unchanged: nothing is traced.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from . import backends, ops
from ._api import finish, group_of
from ._graph_module import is_transform_result
from ._pass import (
    Records,
    group_kwarg,
    is_batchnorm_like,
    layer_record,
    norm_kwargs,
    skip_reason,
)
from ._plan import check_ghost_batch_size
from ._report import detach
from ._scope import Walk
from ._select import LayerSelector, rule_for
from ._trace import GhostTracer

__all__ = ["apply_ghost_batchnorm", "ghost_forward", "is_applied", "revert_ghost_batchnorm"]

#: The plain attribute of ``model`` recording an in-place rewrite (not a submodule or buffer: it
#: must not appear in ``state_dict`` or ``modules()``).
_APPLIED_ATTR = "_fxghost_inplace"


def ghost_forward(
    layer: nn.Module,
    ghost_batch_size: int,
    name: str,
    view_kwargs: dict[str, Any],
    norm_kwargs: dict[str, Any],
    after: tuple[str, ...],
    input: Tensor,
) -> Tensor:
    """The forward that :func:`apply_ghost_batchnorm` gives a BatchNorm ``layer``: the same three
    ops, with the same keyword arguments (:func:`fxghost._pass.group_kwarg`,
    :func:`fxghost._pass.norm_kwargs`, made once when applied), that a traced model's rewritten
    graph calls (:mod:`fxghost.ops`), then the layer's ``after`` submodules (timm's
    ``BatchNormAct2d`` runs ``drop`` and ``act``)."""
    groups = ops.ghost_view(input, layer, ghost_batch_size, name, **view_kwargs)
    y = ops.ghost_unview(ops.ghost_norm(groups, layer, ghost_batch_size, name, **norm_kwargs), name)
    for sub in after:
        y = getattr(layer, sub)(y)
    return y


def _ghost_extra_repr(layer: nn.Module, ghost_batch_size: int) -> str:
    # Printing the model shows which layers are ghosted, and with what.
    return f"{type(layer).extra_repr(layer)}, ghost_batch_size={ghost_batch_size}"


def _patched_forward(layer: nn.Module) -> functools.partial[Any] | None:
    forward = layer.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is ghost_forward:
        return forward
    return None


@dataclass
class _Applied:
    ghost_batch_size: int
    only: tuple[str, ...] | None
    backend: str = "auto"
    #: The process group's registry key (None: each process's own batch).
    group: int | None = None
    #: The layers given a ghost forward, by qualified name.
    layers: dict[str, nn.Module] = field(default_factory=dict)


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply_ghost_batchnorm` has ghosted ``model`` (and it was not reverted)."""
    return _APPLIED_ATTR in model.__dict__


def _only_key(only: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if only is None:
        return None
    return (only,) if isinstance(only, str) else tuple(only)


def _settings(applied: _Applied) -> str:
    text = f"ghost_batch_size={applied.ghost_batch_size}"
    if applied.only is not None:
        text += f", only={list(applied.only)}"
    if applied.backend != "auto":
        text += f", backend={applied.backend!r}"
    if applied.group is not None:
        text += ", a process_group"
    return text


def _unwrap(model: nn.Module, what: str) -> nn.Module:
    """The module to work on: ``model``, or the one a ``torch.compile``, DDP or DataParallel
    wrapper calls (they call its submodules' forwards, so ghosting under them works, and DDP's
    buckets hold the same Parameters)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxghost: {what} takes a torch.nn.Module, got {type(model).__name__}")
    if type(model).__name__ == "FullyShardedDataParallel":
        raise TypeError(
            f"fxghost: {what} was given a FullyShardedDataParallel; apply it to the model before "
            "wrapping (FSDP flattens the layers' parameters)"
        )
    if type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper, not imported here
        return _unwrap(model._modules["_orig_mod"], what)  # type: ignore[arg-type]
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return _unwrap(model.module, what)
    return model


def apply_ghost_batchnorm(
    model: nn.Module,
    ghost_batch_size: int = 32,
    optimizers: Any = None,
    *,
    only: Iterable[str] | str | None = None,
    process_group: Any = None,
    backend: str = "auto",
) -> nn.Module:
    """Ghost every BatchNorm of ``model``, in place, and return ``model``.

    No module is replaced: each BatchNorm layer (``nn.BatchNorm1d/2d/3d``, timm's
    ``BatchNormAct2d`` and classes taught with
    [`fxghost.register_batchnorm`][fxghost.register_batchnorm]) gets a ghost
    forward of its own, so every module keeps its type, its place in the tree and its identity.
    Containers index as before, aliases stay live, hooks on any module fire as before (backward
    hooks too), ``state_dict`` keys are unchanged, and an optimizer built before keeps working.
    The model's own code runs unchanged: nothing is traced. Printing the model shows
    ``ghost_batch_size=`` on each ghosted layer.

    The name and the first three arguments are Composer's ``apply_ghost_batchnorm``, so that
    switching is one import. ``optimizers`` is accepted for that reason and not used: Composer's
    module surgery creates new parameters that optimizers must be re-bound to; here the
    parameters are the same objects, so there is nothing to re-bind.

    Applying again with the same settings does nothing; with others, it raises ``ValueError``:
    call [`revert_ghost_batchnorm`][fxghost.revert_ghost_batchnorm] first.
    ``fxghost.report(model)`` lists every layer, and one
    [`fxghost.PartialRewriteWarning`][fxghost.PartialRewriteWarning] counts those not ghosted
    (BatchNorm subclasses not taught with
    [`fxghost.register_batchnorm`][fxghost.register_batchnorm], ``SyncBatchNorm``). Given the
    wrapper that ``torch.compile``, ``DistributedDataParallel`` or ``DataParallel`` returns, it
    ghosts the module inside.

    Args:
        model: the module whose BatchNorm layers to ghost (it may itself be one).
        ghost_batch_size: samples per ghost batch, a positive int.
        optimizers: ignored (see above).
        only: qualified layer names or glob patterns to ghost (default: all).
        process_group: as for [`fxghost.transform`][fxghost.transform].
        backend: as for [`fxghost.transform`][fxghost.transform].

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a bad ``ghost_batch_size`` or ``backend``, ``only`` matching no layer, a
            module already ghosted with other settings (by this model or another sharing the
            layer), or one made by [`fxghost.transform`][fxghost.transform]; as for
            [`fxghost.transform`][fxghost.transform], a ``backend`` other than ``"auto"`` with
            a ``process_group`` of several processes, or a group this process is not a member
            of.
        TypeError: ``model`` is not a module, or is wrapped in FullyShardedDataParallel;
            ``only`` holds something other than names, or ``process_group`` is not a
            ``torch.distributed.ProcessGroup``.
        RuntimeError: ``backend`` names kernels that cannot run here.

    Examples:
        >>> import torch, fxghost
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
        >>> fxghost.apply_ghost_batchnorm(model, ghost_batch_size=4) is model
        True
        >>> type(model[1]).__name__, repr(model[1]).endswith("ghost_batch_size=4)")
        ('BatchNorm1d', True)
        >>> _ = model(torch.randn(10, 4))            # ghost batches of 4, 4 and 2 samples
        >>> int(model[1].num_batches_tracked)
        3
        >>> "ghost" in repr(fxghost.revert_ghost_batchnorm(model)[1])
        False
    """
    del optimizers  # same Parameter objects: nothing to re-bind (see the docstring)
    inner = _unwrap(model, "apply_ghost_batchnorm")
    g = check_ghost_batch_size(ghost_batch_size)
    group, group_size = group_of(process_group, backends.check(backend))
    wanted = _Applied(g, _only_key(only), backend, group)
    applied: _Applied | None = inner.__dict__.get(_APPLIED_ATTR)
    if applied is not None:
        same = (applied.ghost_batch_size, applied.only, applied.backend, applied.group)
        if same == (g, wanted.only, backend, group):
            return model
        raise ValueError(
            f"fxghost: {type(inner).__name__} already has ghost BatchNorm applied with "
            f"{_settings(applied)}, not with {_settings(wanted)}; call "
            "fxghost.revert_ghost_batchnorm(model) first to apply other settings"
        )
    if is_transform_result(inner):
        raise ValueError(
            "fxghost: this module was produced by fxghost.transform and is already ghosted; "
            "apply_ghost_batchnorm to the original model instead"
        )

    selector = LayerSelector(only)
    records = Records()
    candidates: list[str] = []
    chosen: dict[str, nn.Module] = {}
    seen: set[nn.Module] = set()
    for name, layer in inner.named_modules():
        shown = name or type(layer).__name__
        rule = rule_for(layer)
        if rule is None:
            if is_batchnorm_like(layer):
                records.replace(layer_record(shown, layer, False, skip_reason(layer), None))
            continue
        candidates.append(name)
        if not selector.selects(name):
            reason = f"not selected by {selector.describe()}"
            records.replace(layer_record(shown, layer, False, reason, None, warn=False))
            continue
        if layer in seen:  # a layer registered under two names is ghosted once
            continue
        seen.add(layer)
        patched = _patched_forward(layer)
        settings = (g, shown, group_kwarg(group), norm_kwargs(backend, group))
        if patched is not None and patched.args[1:5] != settings:
            raise ValueError(
                f"fxghost: layer '{shown}' ({type(layer).__name__}) is already ghosted with "
                f"ghost_batch_size={patched.args[1]}, through another model sharing it; revert "
                "that model first (fxghost.revert_ghost_batchnorm)"
            )
        if "forward" in layer.__dict__ and patched is None:
            reason = (
                "its forward was replaced on the instance by other code, which fxghost keeps; "
                "restore BatchNorm's forward (del layer.forward) to ghost it"
            )
            records.replace(layer_record(shown, layer, False, reason, None))
            continue
        chosen[name] = layer
        records.replace(layer_record(shown, layer, True, "", g, group_size=group_size))
    walk = Walk(g, selector, GhostTracer, backend=backend, process_group=(group, group_size))
    walk.records.update(records)
    walk.candidates += candidates
    # The report and the one warning, as transform gives them; checks `only` before any change.
    # The warning names the line that called apply_ghost_batchnorm.
    finish(inner, inner, walk, stacklevel=3)
    for name, layer in chosen.items():
        shown = name or type(layer).__name__
        rule = rule_for(layer)
        after = tuple(s for s in rule.after if not isinstance(getattr(layer, s), nn.Identity))  # type: ignore[union-attr]
        layer.__dict__["forward"] = functools.partial(
            ghost_forward, layer, g, shown, group_kwarg(group), norm_kwargs(backend, group), after
        )
        layer.__dict__["extra_repr"] = functools.partial(_ghost_extra_repr, layer, g)
        wanted.layers[name] = layer
    object.__setattr__(inner, _APPLIED_ATTR, wanted)
    return model


def revert_ghost_batchnorm(model: nn.Module) -> nn.Module:
    """Undo [`apply_ghost_batchnorm`][fxghost.apply_ghost_batchnorm]: give each ghosted layer back
    BatchNorm's own forward, and return ``model``, for export and deployment.

    Nothing else changes: the layers are the same objects, holding the trained weights and
    running statistics.

    Args:
        model: a module given to [`apply_ghost_batchnorm`][fxghost.apply_ghost_batchnorm] (or
            its compile/DDP wrapper).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: ``model`` has no ghost BatchNorm applied in place.
        TypeError: ``model`` is not a module, or is wrapped in FullyShardedDataParallel.

    Examples:
        >>> import torch, fxghost
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn)
        >>> _ = fxghost.apply_ghost_batchnorm(model, 8).double()
        >>> fxghost.revert_ghost_batchnorm(model)[1] is bn, bn.running_mean.dtype
        (True, torch.float64)
    """
    inner = _unwrap(model, "revert_ghost_batchnorm")
    applied: _Applied | None = inner.__dict__.get(_APPLIED_ATTR)
    if applied is None:
        raise ValueError(
            f"fxghost: {type(inner).__name__} has no ghost BatchNorm applied in place; "
            "revert_ghost_batchnorm undoes fxghost.apply_ghost_batchnorm (a module from "
            "fxghost.transform is a separate object: use the original model)"
        )
    for layer in applied.layers.values():
        if _patched_forward(layer) is not None:
            del layer.__dict__["forward"]
            layer.__dict__.pop("extra_repr", None)
    del inner.__dict__[_APPLIED_ATTR]
    detach(inner)
    return model
