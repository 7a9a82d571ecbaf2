"""The three operations that a rewritten BatchNorm becomes in the graph.

``ghost_view`` (reshape) -> ``ghost_norm`` (normalize) -> ``ghost_unview`` (reshape back). Each
takes the BatchNorm module itself as an argument and reads its training flag, momentum and eps at
run time, just as ``BatchNorm.forward`` does: ``gm.train()``/``gm.eval()`` (or ``bn.eval()`` on one
layer), and a momentum schedule, take effect without re-tracing. Weights and running statistics
are the module's own tensors, so they are shared with the original model.

The ops are leaves for FX: when a rewritten GraphModule is traced again they are recorded as
single nodes, not traced through.

Examples:
    >>> import torch, fxghost.ops as ops
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> groups = ops.ghost_view(torch.randn(10, 3), bn, 4, "bn")
    >>> [tuple(t.shape) for t in groups if t is not None]
    [(2, 4, 3), (1, 2, 3)]
    >>> ops.ghost_unview(ops.ghost_norm(groups, bn, 4, "bn"), "bn").shape
    torch.Size([10, 3])
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _distributed, _math, backends
from ._graph_module import has_hooks
from ._plan import plan_ghost_batches, uses_batch_stats

__all__ = [
    "EPILOGUES",
    "GhostGroups",
    "checkpoint",
    "ghost_hooks",
    "ghost_norm",
    "ghost_pre_hooks",
    "ghost_unview",
    "ghost_view",
]

GhostGroups = tuple[Tensor, Tensor | None]
"""``(main, tail)``. From [`ghost_view`][fxghost.ops.ghost_view]: ``main`` a
``(G, c, C, *spatial)`` view of the full ghost batches, ``tail`` a ``(1, r, C, *spatial)`` view of
the shorter last one, or ``None`` when ``c`` divides ``N``. From
[`ghost_norm`][fxghost.ops.ghost_norm]: the normalized samples, sample-first (``(G * c, C, ...)``
and ``(r, C, ...)``)."""


def _find_proxy(args: tuple[Any, ...] | list[Any]) -> torch.fx.Proxy | None:
    for a in args:
        if isinstance(a, torch.fx.Proxy):
            return a
        if isinstance(a, (tuple, list)):
            found = _find_proxy(a)
            if found is not None:
                return found
    return None


class _GraphOp:
    """A graph op that FX records as one ``call_function`` node whenever it sees Proxy arguments.

    ``torch.fx.wrap`` only patches the caller's own globals, not the namespace of a GraphModule's
    generated code, so a re-traced rewritten graph would trace into the op and fail on its
    shape-dependent Python logic. Checking for proxies works under any tracer. Being an object
    also gives the op a readable ``repr`` in ``print_tabular``.

    Attributes:
        fn: the plain function, which the op calls with real tensors (a test may replace it to
            observe the calls).
    """

    def __init__(self, fn: Callable[..., Any], step: str) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self._step = step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            proxy = _find_proxy((*args, *kwargs.values()))
            if proxy is not None:
                layer_name = args[-1] if args and isinstance(args[-1], str) else None
                node_name = f"{layer_name.replace('.', '_')}_{self._step}" if layer_name else None
                out = proxy.tracer.create_proxy("call_function", self, args, kwargs, name=node_name)
                # Re-tracing (also what unpickling a GraphModule does) keeps the provenance.
                out.node.meta["fxghost"] = {
                    "source_layer": layer_name,
                    "ghost_batch_size": args[2]
                    if self._step in ("ghost_view", "ghost_norm")
                    else None,
                    "step": self._step,
                    **({"epilogue": kwargs["epilogue"]} if kwargs.get("epilogue") else {}),
                }
                return out
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.__module__}.{self.__name__}"  # type: ignore[attr-defined]

    def __reduce__(self) -> str:
        return self.__name__  # type: ignore[attr-defined,no-any-return]


def _fx_leaf(step: str) -> Callable[[Callable[..., Any]], Any]:
    return lambda fn: _GraphOp(fn, step)


@_fx_leaf("ghost_view")
def ghost_view(
    x: Tensor,
    layer: _BatchNorm,
    ghost_batch_size: int,
    name: str,
    process_group: int | None = None,
) -> GhostGroups:
    """View ``x`` of shape ``(N, C, *spatial)`` as ghost batches, without copying.

    When ``layer`` normalizes with running statistics (eval mode), the whole batch is one group and
    nothing is checked beyond BatchNorm's own input checks: any ``N`` works. With a
    ``process_group`` (a key of ``fxghost._distributed``) the ghost batches span the group's
    processes: ``x`` is one group here, checked only locally (the group's ``N`` counts, and is
    known in [`ghost_norm`][fxghost.ops.ghost_norm]).

    Args:
        x: the layer's input, ``(N, C, *spatial)``.
        layer: the BatchNorm module; its training flag and running statistics are read now.
        ghost_batch_size: samples per ghost batch.
        name: the layer's qualified name, for error messages and the graph node's name.
        process_group: the key of the process group the ghost batches span (as
            ``fxghost.transform(process_group=...)`` registers it), or ``None``: this process's
            batch alone.

    Returns:
        The [`GhostGroups`][fxghost.ops.GhostGroups] views of ``x``; ``(x.unsqueeze(0), None)``
        in eval mode, with a process group, or for a batch of no samples.

    Raises:
        ValueError: ``x``'s dimensions or channels do not fit ``layer``; or, in training, ``x``
            holds fewer than ``ghost_batch_size`` samples, or would leave a ghost batch with a
            single value per channel.
        fxghost.InputDtypeError: BatchNorm refuses ``x``'s dtype with ``layer``'s parameters
            and running statistics.
    """
    if not uses_batch_stats(layer):
        return x.unsqueeze(0), None
    if process_group is not None:
        _distributed.check_input(layer, name, x, process_group)
        return x.unsqueeze(0), None
    plan = plan_ghost_batches(layer, name, x, ghost_batch_size)
    if plan.requested == 0:  # no samples: no ghost batch
        return x.unsqueeze(0), None
    # view, not unflatten: unflatten makes the same view through one more dispatch per call.
    if not plan.tail:
        return x.view(plan.full, plan.size, *x.shape[1:]), None
    # split, not narrow: narrow's backward zero-fills a full-size gradient per piece.
    body, tail = x.split([plan.full * plan.size, plan.tail])
    return body.view(plan.full, plan.size, *x.shape[1:]), tail.unsqueeze(0)


#: The epilogues :func:`ghost_norm` applies after normalizing: ``relu(y)``, and
#: ``relu(y + residual)``.
EPILOGUES = ("relu", "add_relu")


@_fx_leaf("ghost_norm")
def ghost_norm(
    groups: GhostGroups,
    layer: _BatchNorm,
    ghost_batch_size: int,
    name: str,
    backend: str = "auto",
    process_group: int | None = None,
    *,
    epilogue: str | None = None,
    residual: Tensor | None = None,
    epilogue_steps: tuple[nn.Module | str, ...] | None = None,
    add_inplace: bool = False,
    activation_module: nn.Module | None = None,
) -> GhostGroups:
    """Normalize each ghost batch with its own statistics and update ``layer``'s running statistics
    as the chunked reference would; in eval mode with running statistics, plain BatchNorm eval.
    ``backend`` names where it runs (``fxghost.backends``; ``"auto"`` chooses per call).
    With a ``process_group``, the ghost batches of the group's concatenated batch
    (``fxghost._distributed``); eval with running statistics does not communicate.
    A batch of no samples (N=0) forms no ghost batch: its output is plain BatchNorm's (empty,
    differentiable) and nothing is updated, ``num_batches_tracked`` included, as in the chunked
    reference (plain BatchNorm would count the empty batch as one).

    With an ``epilogue`` (the graph pass fuses a BatchNorm followed by a ReLU, or by a residual
    add and a ReLU, into this call), the output is the unfused graph's, bit for bit:
    ``relu(y)``, or ``relu(y + residual)``. In training with batch statistics the backend
    applies it to each piece of the batch, the residual split as ``ghost_view`` splits the
    input (a kernel backend in the same kernel); elsewhere (eval with running statistics, a
    process group, a batch without samples or values, a residual whose shape, dtype or device
    differs from the output's), and whenever a module of ``epilogue_steps`` has hooks by then,
    it computes as the unfused graph does after the normalization: each of ``epilogue_steps``
    in order, its modules called themselves, so that their hooks fire and see the values they
    saw in the unfused graph.

    Args:
        groups: [`ghost_view`][fxghost.ops.ghost_view]'s views of the layer's input.
        layer: the BatchNorm module whose parameters, running statistics, momentum and eps are
            used (and whose running statistics are updated).
        ghost_batch_size: samples per ghost batch.
        name: the layer's qualified name, for error messages and the graph node's name.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``, as for
            [`fxghost.transform`][fxghost.transform].
        process_group: as for [`ghost_view`][fxghost.ops.ghost_view].
        epilogue: what follows the normalization: ``None``, ``"relu"`` or ``"add_relu"``.
        residual: with ``"add_relu"``, the add's other operand: ``(N, C, *spatial)`` like the
            layer's input (anything else is added as the unfused graph adds it).
        epilogue_steps: what the epilogue stands for in the unfused graph, in the order the
            graph ran it: any pass-through ``nn.Identity`` modules it called (timm's
            ``drop_block``), ``"add"`` where the residual add was (with ``"add_relu"``), and
            last the ``nn.ReLU`` module it called, or ``"relu"`` for ``torch.relu``,
            ``F.relu`` or ``.relu()``: e.g. ``(drop_block, act1)`` or ``("add", relu)``.
            ``None``: ``("relu",)``, or ``("add", "relu")``.
        add_inplace: whether the graph's add was in place on its first operand
            (``out += residual``): a residual of another dtype or shape is then added as the
            in-place add does.
        activation_module: the older spelling of ``epilogue_steps=(activation_module,)``, or
            ``("add", activation_module)``, which graphs generated by earlier versions of
            fxghost pass; not together with ``epilogue_steps``.

    Returns:
        The normalized samples as [`GhostGroups`][fxghost.ops.GhostGroups], sample-first, for
        [`ghost_unview`][fxghost.ops.ghost_unview]; with an epilogue, after it.

    Raises:
        ValueError: ``backend`` names kernels that cannot take this input; or, with a process
            group, the group's training batch is smaller than ``ghost_batch_size``, leaves a
            ghost batch with a single value per channel, or failed another process's input
            checks; or ``layer`` has ``momentum=None`` but no ``num_batches_tracked``; or
            ``epilogue`` is not one of those above, ``"add_relu"`` comes without a
            ``residual``, ``residual``, ``epilogue_steps`` or ``activation_module`` comes
            without the epilogue that uses them, or ``epilogue_steps`` is not of the form
            above.
    """
    if (
        epilogue is None
        and residual is None
        and epilogue_steps is None
        and activation_module is None
    ):
        return _normalize(groups, layer, ghost_batch_size, name, backend, process_group)
    steps = _epilogue_steps(name, layer, epilogue, residual, epilogue_steps, activation_module)
    main, tail = groups
    hooked = any(isinstance(step, nn.Module) and has_hooks(step) for step in steps)
    if not hooked and process_group is None and uses_batch_stats(layer):
        pieces = _epilogue_pieces(main, tail, residual)
        if pieces is not None:
            return _normalize(groups, layer, ghost_batch_size, name, backend, process_group, pieces)
    y = ghost_unview.fn(
        _normalize(groups, layer, ghost_batch_size, name, backend, process_group), name
    )
    for step in steps:
        if isinstance(step, nn.Module):
            y = step(y)
        elif step == "add":
            y = y.add_(residual) if add_inplace else y + residual
        else:
            y = torch.relu(y)
    return y, None


def _epilogue_steps(
    name: str,
    layer: nn.Module,
    epilogue: str | None,
    residual: object,
    epilogue_steps: object,
    activation_module: object,
) -> tuple[nn.Module | str, ...]:
    """The steps of :func:`ghost_norm`'s epilogue (its ``epilogue_steps``, or what the older
    ``activation_module`` or neither stands for); a ``ValueError`` naming the layer for
    arguments that do not make an epilogue."""
    where = f"fxghost: layer '{name}' ({type(layer).__name__})"
    if epilogue not in EPILOGUES:
        raise ValueError(
            f"{where}: epilogue={epilogue!r}; use one of {', '.join(map(repr, EPILOGUES))} "
            "(residual= and epilogue_steps= go with one)"
        )
    if (epilogue == "add_relu") != (residual is not None):
        raise ValueError(
            f"{where}: epilogue='add_relu' takes the add's other operand as residual=, and "
            "epilogue='relu' none"
        )
    add: tuple[str, ...] = ("add",) if epilogue == "add_relu" else ()
    if activation_module is not None:
        if epilogue_steps is not None:
            raise ValueError(
                f"{where}: activation_module= is the older spelling of an epilogue_steps= "
                "that ends in it; pass epilogue_steps= alone"
            )
        if type(activation_module) is not nn.ReLU:
            raise ValueError(
                f"{where}: activation_module= takes the nn.ReLU module the epilogue stands "
                f"for, not a {type(activation_module).__name__}"
            )
        return (*add, activation_module)
    if epilogue_steps is None:
        return (*add, "relu")
    steps = tuple(epilogue_steps) if isinstance(epilogue_steps, (tuple, list)) else ()
    # Only what the fused path may skip or compute itself: nn.Identity returns its input, and a
    # plain nn.ReLU computes what the backend applies.
    between = [s for s in steps[:-1] if type(s) is not nn.Identity]
    last = steps[-1] if steps else None
    is_relu = type(last) is nn.ReLU or (isinstance(last, str) and last == "relu")
    adds = all(isinstance(s, str) and s == "add" for s in between)
    if not is_relu or not adds or len(between) != len(add):
        raise ValueError(
            f"{where}: epilogue_steps={epilogue_steps!r} with epilogue={epilogue!r}; pass the "
            "steps the unfused graph ran, in order: any nn.Identity modules"
            + (", 'add' where the residual add was, any nn.Identity modules" if add else "")
            + ", then the nn.ReLU module or 'relu'"
        )
    return steps


def _epilogue_pieces(
    main: Tensor, tail: Tensor | None, residual: object
) -> tuple[backends.Epilogue | None, backends.Epilogue | None] | None:
    """The epilogue of each piece of a training batch, the residual split as ``ghost_view``
    split the input; ``None`` where the epilogue is applied unfused instead: a batch without
    values, or a residual that is not a tensor of the output's shape, dtype and device (the
    unfused add broadcasts or promotes it)."""
    if not main.numel():
        return None
    if residual is None:
        relu = backends.Epilogue(None, True)
        return relu, None if tail is None else relu
    if not isinstance(residual, Tensor):
        return None
    full = main.shape[0] * main.shape[1]
    rest = 0 if tail is None else tail.shape[1]
    if (
        residual.shape != (full + rest, *main.shape[2:])
        or residual.dtype != main.dtype
        or residual.device != main.device
    ):
        return None
    if tail is None:
        return backends.Epilogue(residual.view(main.shape), True), None
    body, end = residual.split([full, rest])
    return backends.Epilogue(body.view(main.shape), True), backends.Epilogue(end.unsqueeze(0), True)


def _normalize(
    groups: GhostGroups,
    layer: _BatchNorm,
    ghost_batch_size: int,
    name: str,
    backend: str,
    process_group: int | None,
    epilogue: tuple[backends.Epilogue | None, backends.Epilogue | None] | None = None,
) -> GhostGroups:
    """:func:`ghost_norm` without an epilogue, or in training with batch statistics, with the
    pieces' ``epilogue`` (:func:`_epilogue_pieces`), passed to the backend."""
    main, tail = groups
    if not uses_batch_stats(layer):
        y = F.batch_norm(
            main.squeeze(0),
            layer.running_mean,
            layer.running_var,
            layer.weight,
            layer.bias,
            False,
            0.0,
            layer.eps,
        )
        return y, None
    if process_group is not None:
        y = _distributed.ghost_norm(main.squeeze(0), layer, ghost_batch_size, name, process_group)
        return y, None
    n = main.shape[0] * main.shape[1] + (tail.shape[1] if tail is not None else 0)
    weight, bias, eps = layer.weight, layer.bias, layer.eps
    if n == 0:
        return _math.no_ghost_batch(main.flatten(0, 1), weight, bias, eps), None
    running_mean = layer.running_mean
    tracks = layer.training and layer.track_running_stats and running_mean is not None
    if not main.numel():
        # Samples without values (a dimension of size 0): each ghost batch is an empty batch
        # to the reference's BatchNorm calls, which count it and have no statistics to update.
        nbt = layer.num_batches_tracked
        if tracks and nbt is not None:
            with torch.no_grad():
                nbt.add_(main.shape[0] + (tail is not None))
        y_tail = None if tail is None else _math.no_ghost_batch(tail[0], weight, bias, eps)
        return _math.no_ghost_batch(main.flatten(0, 1), weight, bias, eps), y_tail
    impl = backends.implementation_for(main, backend, name, fused=epilogue is not None)
    backends.record(layer, impl)
    update = None
    if tracks:
        update = backends.RunningStatsUpdate(
            cast(Tensor, running_mean),
            cast(Tensor, layer.running_var),  # BatchNorm keeps both or neither
            layer.num_batches_tracked,
            layer.momentum,
            (n + ghost_batch_size - 1) // ghost_batch_size,
        )
    return impl.norm_batch(main, tail, backends.NormParams(weight, bias, eps), update, epilogue)


@_fx_leaf("ghost_unview")
def ghost_unview(groups: GhostGroups, name: str) -> Tensor:
    """The normalized batch ``(N, C, *spatial)`` from [`ghost_norm`][fxghost.ops.ghost_norm]'s
    pieces: the main one itself, not a view of it (so that in-place ops after it cost nothing extra
    in backward), or it and the tail concatenated.

    Args:
        groups: [`ghost_norm`][fxghost.ops.ghost_norm]'s output.
        name: the layer's qualified name, for the graph node's name.

    Returns:
        The normalized batch, in the input's memory format.
    """
    flat, tail = groups
    if tail is None:
        return flat
    out = torch.cat([flat, tail])
    # cat picks contiguous when a one-sample tail's layout is ambiguous; keep the input's.
    if flat.dim() in (4, 5) and flat.shape[0] > 1:
        fmt = torch.channels_last if flat.dim() == 4 else torch.channels_last_3d
        if flat.is_contiguous(memory_format=fmt) and not out.is_contiguous(memory_format=fmt):
            out = out.contiguous(memory_format=fmt)
    return out


@_fx_leaf("pre_hooks")
def ghost_pre_hooks(x: Tensor, layer: nn.Module, name: str) -> Tensor:
    """``layer``'s forward pre-hooks, run on its input as ``nn.Module.__call__`` runs them (a hook
    may replace the input). Emitted only for layers that had such hooks when rewritten.

    Args:
        x: the layer's input.
        layer: the module whose hooks run (those registered when called, in order).
        name: the layer's qualified name, for the graph node's name.

    Returns:
        The input the hooks leave: ``x``, or what a hook returned in its place.
    """
    args: tuple[Any, ...] = (x,)
    for hook_id, hook in tuple(layer._forward_pre_hooks.items()):
        if hook_id in layer._forward_pre_hooks_with_kwargs:
            result = hook(layer, args, {})
            if result is not None:
                args = result[0]
        else:
            result = hook(layer, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args[0]  # type: ignore[no-any-return]


@_fx_leaf("hooks")
def ghost_hooks(y: Tensor, x: Tensor, layer: nn.Module, name: str) -> Tensor:
    """``layer``'s forward hooks, run on its input ``x`` and output ``y`` as
    ``nn.Module.__call__`` runs them (a hook may replace the output).

    Args:
        y: the layer's output.
        x: the layer's input, as the hooks see it.
        layer: the module whose hooks run (those registered when called, in order).
        name: the layer's qualified name, for the graph node's name.

    Returns:
        The output the hooks leave: ``y``, or what a hook returned in its place.
    """
    for hook_id, hook in tuple(layer._forward_hooks.items()):
        if hook_id in layer._forward_hooks_with_kwargs:
            result = hook(layer, (x,), {}, y)
        else:
            result = hook(layer, (x,), y)
        if result is not None:
            y = result
    return y


@_fx_leaf("checkpoint")
def checkpoint(function: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, **kwargs)``, as one graph node: what a
    model's own ``checkpoint(self.block, x)`` becomes when traced, so that re-tracing the graph
    (or unpickling it) keeps it a checkpoint call under any tracer.

    Args:
        function: the submodule to run without storing its activations.
        *args: its positional arguments.
        **kwargs: its keyword arguments, and ``checkpoint``'s own (``use_reentrant``, ...).

    Returns:
        ``function``'s output.
    """
    return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)
