"""How a batch splits into ghost batches, and the checks that guard it.

Shared by the graph ops and by :mod:`fxghost.reference`, so that both accept the same inputs and
raise the same errors with the same messages.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_int

__all__ = [
    "GhostPlan",
    "InputDtypeError",
    "check_ghost_batch_size",
    "check_layer_input",
    "chunk_split",
    "dtype_problem",
    "plan_ghost_batches",
    "uses_batch_stats",
]


class InputDtypeError(TypeError, RuntimeError):
    """A layer got an input whose dtype BatchNorm refuses.

    A ``TypeError`` by fxghost's rule for user errors, and a ``RuntimeError`` because that is what
    plain BatchNorm raises for the same input, so code written against plain BatchNorm still
    catches it. Its message names the layer and the dtypes at fault.
    """


class GhostPlan(NamedTuple):
    """The ghost batches of an ``N``-sample batch, exactly as ``x.chunk(requested, dim=0)`` forms
    them.

    ``full`` ghost batches of ``size`` samples, then one of ``tail`` samples when ``tail > 0``.
    ``requested`` is ``ceil(N / g)``: the momentum divisor, even when ``chunk`` returns fewer
    pieces.
    """

    requested: int
    size: int
    full: int
    tail: int


def check_ghost_batch_size(ghost_batch_size: object) -> int:
    """``ghost_batch_size`` as an int; ``ValueError`` if it is not a positive int."""
    if isinstance(ghost_batch_size, bool):
        raise ValueError(
            f"fxghost: ghost_batch_size must be a positive int, got {ghost_batch_size!r}; "
            "pass e.g. ghost_batch_size=32"
        )
    if not isinstance(ghost_batch_size, int):
        try:
            # numpy and torch integer scalars are fine; floats such as 32.0 are not.
            value = operator.index(ghost_batch_size)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                f"fxghost: ghost_batch_size must be a positive int, got {ghost_batch_size!r} "
                f"({type(ghost_batch_size).__name__}); pass e.g. ghost_batch_size=32"
            ) from None
        ghost_batch_size = value
    if ghost_batch_size < 1:
        raise ValueError(
            f"fxghost: ghost_batch_size must be a positive int, got {ghost_batch_size}; "
            "pass e.g. ghost_batch_size=32"
        )
    return int(ghost_batch_size)


def uses_batch_stats(layer: nn.Module) -> bool:
    """Whether BatchNorm's own forward would normalize with batch statistics (it does in training,
    and always when it keeps no running statistics)."""
    return bool(layer.training) or (layer.running_mean is None and layer.running_var is None)


_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_LAYER_TENSORS = ("weight", "bias", "running_mean", "running_var")

#: Key: the input's dtype, then the dtypes of weight, bias, running_mean and running_var (None for
#: each the layer lacks). Value: why BatchNorm refuses that combination, or None.
_DTYPE_VERDICTS: dict[tuple[torch.dtype | None, ...], str | None] = {}


def dtype_problem(key: tuple[torch.dtype | None, ...]) -> str | None:
    """BatchNorm's dtype rules, as its CPU kernels apply them (tests compare this with
    ``F.batch_norm`` on each device they run on): a floating-point input; every parameter and
    running statistic in the input's dtype, or all float32 under a float16/bfloat16 input
    (mixed precision)."""
    x_dtype, *state = key
    if x_dtype not in _FLOATING:
        return (
            f"got a {x_dtype} input, and BatchNorm normalizes only float16, bfloat16, float32 "
            "and float64 inputs: convert the batch, e.g. x.float()"
        )
    present = {n: d for n, d in zip(_LAYER_TENSORS, state, strict=True) if d is not None}
    dtypes = set(present.values())
    if not dtypes or dtypes == {x_dtype} or (x_dtype in _HALF and dtypes == {torch.float32}):
        return None
    if len(dtypes) > 1:
        held = ", ".join(f"{n} {d}" for n, d in present.items())
        return (
            f"got a {x_dtype} input but holds {held}; BatchNorm needs all of them in one dtype, "
            f"the input's (or float32 under a float16/bfloat16 input): convert the layer, e.g. "
            f"layer.to({x_dtype})"
        )
    (held_dtype,) = dtypes
    kinds = [
        k
        for k, names in (
            ("parameters", _LAYER_TENSORS[:2]),
            ("running statistics", _LAYER_TENSORS[2:]),
        )
        if any(n in present for n in names)
    ]
    return (
        f"got a {x_dtype} input but its {' and '.join(kinds)} are {held_dtype}; BatchNorm needs "
        f"the input in their dtype (or float16/bfloat16 with float32 ones, mixed precision): "
        f"convert the batch with x.to({held_dtype}), or the model with model.to({x_dtype})"
    )


def _check_dtypes(layer: nn.Module, name: str, x: torch.Tensor) -> None:
    # Runs on every training call of every layer, so the verdict is cached per combination of
    # dtypes, and the tensors are read from the module's dicts (_BatchNorm registers all four
    # there, None when absent) rather than through Module.__getattr__, a Python fallback that
    # costs several times as much.
    # Under torch.compile the rule is evaluated instead, on dtypes that are constants of the
    # trace, so that dynamo guards on no global dict.
    if torch.compiler.is_compiling():
        state = [getattr(layer, n) for n in _LAYER_TENSORS]
        problem = dtype_problem((x.dtype, *(None if t is None else t.dtype for t in state)))
    else:
        params, buffers = layer._parameters, layer._buffers
        weight, bias = params.get("weight"), params.get("bias")
        mean, var = buffers.get("running_mean"), buffers.get("running_var")
        key = (
            x.dtype,
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
            None if mean is None else mean.dtype,
            None if var is None else var.dtype,
        )
        try:
            problem = _DTYPE_VERDICTS[key]
        except KeyError:
            problem = _DTYPE_VERDICTS.setdefault(key, dtype_problem(key))
    if problem is not None:
        raise InputDtypeError(f"fxghost: layer '{name}' ({type(layer).__name__}) {problem}")


def check_layer_input(layer: nn.Module, name: str, x: torch.Tensor) -> None:
    """BatchNorm's own checks of ``x`` for ``layer``, with the layer named: its number of
    dimensions and channels (``ValueError``) and its dtype (:class:`InputDtypeError`)."""
    # BatchNorm's own dimension check (ValueError "expected 4D input (got 3D input)"), with the
    # layer named.
    try:
        layer._check_input_dim(x)  # type: ignore[operator]
    except ValueError as err:
        raise ValueError(
            f"fxghost: layer '{name}' ({type(layer).__name__}): {err}; input shape {tuple(x.shape)}"
        ) from None
    num_features = layer.num_features
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(
            f"fxghost: layer '{name}' ({type(layer).__name__}) has num_features={num_features} "
            f"but got an input of shape {tuple(x.shape)} with "
            f"{x.shape[1] if x.dim() >= 2 else 'no'} channels in dim 1; "
            "the input must be (N, C, ...) with C equal to num_features"
        )
    _check_dtypes(layer, name, x)


def chunk_split(n: int, g: int) -> GhostPlan:
    """The ghost batches of ``n > 0`` samples (a plain int), as ``chunk(ceil(n / g))`` cuts them."""
    requested = (n + g - 1) // g
    size = (n + requested - 1) // requested
    full = n // size
    return GhostPlan(requested=requested, size=size, full=full, tail=n - full * size)


def plan_ghost_batches(
    layer: nn.Module, name: str, x: torch.Tensor, ghost_batch_size: int
) -> GhostPlan:
    """Validate ``x`` for ``layer`` in batch-statistics mode and return its ghost batches.

    Raises ``ValueError`` naming the layer, ``N`` and ``g`` when a non-empty training batch is
    smaller than the ghost size or a ghost batch would have a single value per channel, and
    :class:`InputDtypeError` for an input dtype that BatchNorm refuses; both before anything has
    changed. A batch of no samples (N=0), in training as in eval, forms no ghost batch
    (``requested == 0``).
    """
    check_layer_input(layer, name, x)
    g = ghost_batch_size
    n = x.shape[0]
    kind = type(layer).__name__
    if n == 0:
        return GhostPlan(requested=0, size=0, full=0, tail=0)
    if layer.training and n < g:
        raise ValueError(
            f"fxghost: layer '{name}' ({kind}) got a training batch of N={n} samples, smaller "
            f"than ghost_batch_size={g}. Ghost BatchNorm needs at least one full ghost batch in "
            f"training: feed batches of at least {g} samples (e.g. DataLoader(drop_last=True)) "
            "or use a smaller ghost_batch_size."
        )
    if n % g == 0:
        # The common case, and the one torch.compile keeps symbolic in N (a divisibility guard):
        # nested ceil-divisions of a symbolic N send sympy's simplifier into minutes of work.
        requested, size, full, tail = n // g, g, n // g, 0
    else:
        if isinstance(n, torch.SymInt):
            # Uneven batches (an epoch's last) are rare: specialize on N instead.
            n = guard_int(n)
        requested, size, full, tail = chunk_split(n, g)
    per_sample = x.numel() // (n * x.shape[1])
    smallest = tail if tail else size
    if smallest * per_sample == 1:
        sizes = f"{full} of {size}" + (f" and one of {tail}" if tail else "")
        raise ValueError(
            f"fxghost: layer '{name}' ({kind}): N={n} with ghost_batch_size={g} forms ghost "
            f"batches of {sizes} sample(s), and one of them has a single value per channel, which "
            "BatchNorm cannot normalize. Use a batch size that leaves at least 2 samples in the "
            "last ghost batch (e.g. a multiple of the ghost size, or DataLoader(drop_last=True)), "
            "or a larger ghost_batch_size."
        )
    return GhostPlan(requested=requested, size=size, full=full, tail=tail)
