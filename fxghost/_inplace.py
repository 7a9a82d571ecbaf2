"""The in-place API: ghost BatchNorm under a model that a framework holds on to.

``transform`` returns a new module, which is right for a plain loop and for ``torch.compile``. A
training framework, though, keeps *its* object (a ``LightningModule``, a ``ComposerModel``, a
``PreTrainedModel``) and calls its methods; it cannot be handed a GraphModule instead. So
:func:`apply_ghost_batchnorm` keeps ``model`` and rewrites what is under it: each child that holds
a BatchNorm is replaced by its rewritten form (the same rewrite ``transform`` applies to a model,
so a child that traces becomes a GraphModule, one that does not is kept as Python with its own
children rewritten). :func:`revert_ghost_batchnorm` puts the original children back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import backends
from ._api import _finish, _timm_rules, group_of
from ._graph_module import GhostGraphModule, LayerGraphModule
from ._pass import holds_candidates, is_batchnorm_like, layer_record, skip_reason
from ._plan import check_ghost_batch_size
from ._report import _META_KEY
from ._scope import Walk, rewrite_module
from ._select import LayerSelector, rule_for
from ._trace import GhostTracer

__all__ = ["apply_ghost_batchnorm", "revert_ghost_batchnorm"]

#: The plain attribute of ``model`` recording an in-place rewrite (not a submodule: the
#: original children it keeps must not appear in ``state_dict`` or ``parameters()``).
_STATE = "_fxghost_inplace"

# Forward hooks the replacement of a child must keep firing: a rewritten child is a GraphModule,
# a new object, and hooks live in the module object's own registries. BatchNorm layers' own hooks
# are excluded: the rewritten graph already calls them (see ``fxghost.ops``).
_HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


@dataclass
class _Applied:
    ghost_batch_size: int
    only: tuple[str, ...] | None
    backend: str = "auto"
    #: The process group's registry key (None: each process's own batch).
    group: int | None = None
    #: Child name -> (the original child, the rewritten child put in its place).
    children: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict)


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


def _check_model(model: nn.Module, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxghost: {what} takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
        type(model).__name__ == "FullyShardedDataParallel"
    ):
        raise TypeError(
            f"fxghost: {what} was given a {type(model).__name__}; apply it to the model before "
            "wrapping (DDP's buckets and buffer lists are built from the module it wraps)"
        )


def apply_ghost_batchnorm(
    model: nn.Module,
    ghost_batch_size: int = 32,
    optimizers: Any = None,
    *,
    only: Iterable[str] | str | None = None,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    autowrap_functions: Iterable[Any] = (),
    strict: bool = False,
    process_group: Any = None,
    backend: str = "auto",
) -> nn.Module:
    """Ghost every BatchNorm under ``model``, in place, and return ``model``.

    ``model`` itself is kept: its class, attributes, methods, hooks and forward. What changes is
    below it: each child holding a BatchNorm is replaced by its rewrite (a GraphModule where the
    child traces; where it does not, a copy kept as Python whose children are rewritten, down to
    each BatchNorm), as :func:`fxghost.transform` rewrites a model. Every Parameter and buffer is
    shared with the original children and ``state_dict`` keys are unchanged, so checkpoints load
    into the plain model with ``strict=True``, and an optimizer built before keeps working.

    The name and the first three arguments are Composer's ``apply_ghost_batchnorm``, so that
    switching is one import. ``optimizers`` is accepted for that reason and not used: Composer's
    module surgery creates new parameters that optimizers must be re-bound to; here the
    parameters are the same objects, so there is nothing to re-bind.

    Applying again with the same settings (``ghost_batch_size``, ``only``, ``backend``,
    ``process_group``) does nothing; with others, it raises ``ValueError``: call
    :func:`revert_ghost_batchnorm` first. ``fxghost.report(model)``
    lists every layer, and one :class:`fxghost.PartialRewriteWarning` counts those not ghosted.
    Given the wrapper that ``torch.compile`` returns, it rewrites under the module it compiles.

    Args:
        model: the module whose submodules to rewrite (not a DistributedDataParallel: apply
            first, then wrap).
        ghost_batch_size: samples per ghost batch, a positive int.
        optimizers: ignored (see above).
        only: qualified layer names or glob patterns to rewrite (default: all).
        leaf_modules, autowrap_functions, strict, process_group, backend: as for
            :func:`fxghost.transform`.

    >>> import torch, fxghost
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    >>> fxghost.apply_ghost_batchnorm(model, ghost_batch_size=4) is model
    True
    >>> fxghost.report(model).rewritten_names
    ['1']
    >>> _ = model(torch.randn(10, 4))            # ghost batches of 4, 4 and 2 samples
    >>> int(model[1].num_batches_tracked)
    3
    >>> type(fxghost.revert_ghost_batchnorm(model)[1]).__name__
    'BatchNorm1d'
    """
    del optimizers  # same Parameter objects: nothing to re-bind (see the docstring)
    _apply(
        model,
        ghost_batch_size,
        only,
        leaf_modules,
        autowrap_functions,
        strict,
        process_group=process_group,
        backend=backend,
    )
    return model


def _apply(
    model: nn.Module,
    ghost_batch_size: int,
    only: Iterable[str] | str | None,
    leaf_modules: Iterable[type[nn.Module] | str],
    autowrap_functions: Iterable[Any],
    strict: bool,
    stacklevel: int = 4,
    process_group: Any = None,
    backend: str = "auto",
) -> None:
    """:func:`apply_ghost_batchnorm`; ``stacklevel`` makes the warning name its caller."""
    _check_model(model, "apply_ghost_batchnorm")
    g = check_ghost_batch_size(ghost_batch_size)
    orig_mod = _compiled(model)
    if orig_mod is not None:
        # torch.compile's wrapper calls the module it compiled: rewrite under that one; dynamo
        # recompiles on the changed submodules.
        _apply(
            orig_mod,
            g,
            only,
            leaf_modules,
            autowrap_functions,
            strict,
            stacklevel + 1,
            process_group,
            backend,
        )
        return
    group, group_size = group_of(process_group, backends.check(backend))
    wanted = _Applied(g, _only_key(only), backend, group)
    applied: _Applied | None = model.__dict__.get(_STATE)
    if applied is not None:
        same = (applied.ghost_batch_size, applied.only, applied.backend, applied.group)
        if same == (g, wanted.only, backend, group):
            return
        raise ValueError(
            f"fxghost: {type(model).__name__} already has ghost BatchNorm applied with "
            f"{_settings(applied)}, not with {_settings(wanted)}; call "
            "fxghost.revert_ghost_batchnorm(model) first to apply other settings"
        )
    if rule_for(model) is not None or isinstance(model, LayerGraphModule):
        raise ValueError(
            f"fxghost: apply_ghost_batchnorm rewrites the submodules of a model, and this "
            f"{type(model).__name__} is itself a BatchNorm layer; use fxghost.transform(layer), "
            "which returns a new module"
        )
    if isinstance(model, GhostGraphModule) or "_" + _META_KEY in model.__dict__:
        raise ValueError(
            "fxghost: this module was produced by fxghost.transform and is already ghosted; "
            "apply_ghost_batchnorm to the original model instead"
        )

    timm_leaves, timm_functions = _timm_rules(model)
    leaves = [*leaf_modules, *timm_leaves]
    functions = [*autowrap_functions, *timm_functions]
    walk = Walk(
        g,
        LayerSelector(only),
        lambda: GhostTracer(leaves, functions),
        strict=strict,
        process_group=(group, group_size),
        backend=backend,
    )
    state = wanted
    done: dict[int, nn.Module] = {}  # a child registered under two names is rewritten once
    for name, child in model._modules.items():
        if child is None or not holds_candidates(child):
            continue
        new = done.get(id(child))
        if new is None:
            new = done[id(child)] = rewrite_module(child, walk, name)
            if new is not child:
                _keep_hooks(child, new)
        if new is not child:
            state.children[name] = (child, new)
    for name, sub in model.named_modules():
        # BatchNorm-like layers in children left alone (SyncBatchNorm, subclasses), for the
        # report and the warning, as transform records them.
        if name and name not in walk.records and is_batchnorm_like(sub):
            walk.records.replace(layer_record(name, sub, False, skip_reason(sub), None))
    # The report and the one warning, as transform gives them; the layers in the model's order,
    # read before any child is replaced.
    _finish(model, model, walk, stacklevel=stacklevel)
    for name, (_, new) in state.children.items():
        model._modules[name] = new
    object.__setattr__(model, _STATE, state)


def revert_ghost_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_ghost_batchnorm`: put the original submodule objects back under
    ``model`` and return it, for export and deployment.

    The originals come back holding the current state: where the rewritten modules hold other
    tensors than the originals (after ``model.to(device)`` or ``model.double()``, which replace
    buffers, or a ``load_state_dict`` with ``assign=True``), the rewritten modules' tensors are put
    into the originals at the same names, as are their train/eval flags. A child that was replaced
    since by something else is left as it is.

    >>> import torch, fxghost
    >>> bn = torch.nn.BatchNorm2d(3)
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn)
    >>> _ = fxghost.apply_ghost_batchnorm(model, 8).double()
    >>> fxghost.revert_ghost_batchnorm(model)[1] is bn, bn.running_mean.dtype
    (True, torch.float64)
    """
    _check_model(model, "revert_ghost_batchnorm")
    orig_mod = _compiled(model)
    if orig_mod is not None:
        revert_ghost_batchnorm(orig_mod)
        return model
    applied: _Applied | None = model.__dict__.get(_STATE)
    if applied is None:
        raise ValueError(
            f"fxghost: {type(model).__name__} has no ghost BatchNorm applied in place; "
            "revert_ghost_batchnorm undoes fxghost.apply_ghost_batchnorm (a module from "
            "fxghost.transform is a separate object: use the original model)"
        )
    for name, (original, new) in applied.children.items():
        if model._modules.get(name) is not new:
            continue
        _copy_state_back(new, original)
        model._modules[name] = original
    del model.__dict__[_STATE]
    model.__dict__.pop("_" + _META_KEY, None)
    return model


def _compiled(model: nn.Module) -> nn.Module | None:
    """The module that ``torch.compile`` wrapped in ``model``, if it is such a wrapper (its
    class is not imported here: that would import dynamo for every user)."""
    orig_mod = model.__dict__.get("_modules", {}).get("_orig_mod")
    return orig_mod if type(model).__name__ == "OptimizedModule" else None


def _keep_hooks(child: nn.Module, new: nn.Module) -> None:
    """Let ``new`` fire the forward hooks registered on ``child`` (the same registries, so a
    handle removes a hook from both)."""
    if isinstance(new, LayerGraphModule):
        return  # a BatchNorm's hooks are calls in its rewritten graph
    for registry in _HOOK_REGISTRIES:
        hooks = getattr(child, registry, None)
        if hooks:
            setattr(new, registry, hooks)


def _copy_state_back(new: nn.Module, original: nn.Module) -> None:
    """Make every module of ``original`` hold the tensors and training flag that its
    counterpart at the same path in ``new`` holds now (usually already the same objects)."""
    targets = dict(original.named_modules(remove_duplicate=False))
    for path, module in new.named_modules(remove_duplicate=False):
        target = targets.get(path)
        if target is None or target is module:
            continue
        target.training = module.training
        for registry in ("_parameters", "_buffers"):
            mine, theirs = getattr(module, registry), getattr(target, registry)
            for key, tensor in mine.items():
                if key in theirs and theirs[key] is not tensor:
                    theirs[key] = tensor
