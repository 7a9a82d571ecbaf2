"""What ``torch.compile`` traces of a rewritten BatchNorm: two composite ops per layer.

Dynamo turns every Python-level tensor op it traces into a graph node at a cost of about a
millisecond, and an ``autograd.Function`` costs it a speculative trace of both the forward and the
backward. Traced through, the ghost formulation and the running-statistics update were half of
dynamo's work on a BatchNorm-heavy network. As ``CompositeImplicitAutograd`` ops dynamo records each
as one node, from a fake-tensor call (integer arguments are SymInts, so a dynamic batch size
stays symbolic); AOT autograd then runs the same Python (the formulation with
its analytic-backward Function, the closed-form update) and inductor sees exactly the ops it saw
before, so the compiled code is unchanged. Only used under ``torch.compile``: eager code calls
:mod:`fxghost._math` and :mod:`fxghost._fast` directly, and ``torch.export`` traces through them
(:func:`wanted`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _math

__all__ = ["ghost_norm", "update_running_stats", "wanted"]

_lib = torch.library.Library("fxghost", "FRAGMENT")
_lib.define(
    "compiled_ghost_norm(Tensor xg, Tensor? weight, Tensor? bias, float eps) "
    "-> (Tensor, Tensor, Tensor)"
)
_lib.impl("compiled_ghost_norm", _math.ghost_norm_compiled, "CompositeImplicitAutograd")
_lib.define(
    "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
    "Tensor(c!)? num_batches_tracked, float? momentum, SymInt requested, Tensor[] means, "
    "Tensor[] vars, SymInt[] counts) -> ()"
)


def _update_impl(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    requested: int,
    means: Sequence[Tensor],
    variances: Sequence[Tensor],
    counts: Sequence[int],
) -> None:
    # compiling=True explicitly: this runs in AOT autograd's trace, after dynamo, where
    # torch.compiler.is_compiling() is False in torch 2.11 (True in 2.14), and the eager path's
    # C kernels and weight cache must not see fake tensors.
    _math.update_running_stats(
        running_mean, running_var, num_batches_tracked, momentum, requested,
        list(zip(means, variances, counts, strict=True)), compiling=True,
    )


_lib.impl("update_running_stats", _update_impl, "CompositeImplicitAutograd")


def wanted() -> bool:
    """Whether the ops here stand in for their Python under tracing: under ``torch.compile``, not
    under ``torch.export``, whose programs should hold only aten ops (loadable without fxghost,
    and what they were before these ops existed); export's trace time matters less."""
    # The flag itself, not torch.compiler.is_exporting(): dynamo in torch 2.11 folds that call to
    # True under torch.compile too. (No flag in older torch: the ops are used under export too.)
    return not getattr(torch.compiler, "_is_exporting_flag", False)


def ghost_norm(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fxghost._math.ghost_norm_compiled`, as one node in dynamo's graph."""
    return torch.ops.fxghost.compiled_ghost_norm(xg, weight, bias, eps)  # type: ignore[no-any-return]


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    requested: int,
    groups: Sequence[tuple[Tensor, Tensor, int]],
) -> None:
    """:func:`fxghost._math.update_running_stats`, as one node in dynamo's graph."""
    torch.ops.fxghost.update_running_stats(
        running_mean, running_var, num_batches_tracked, momentum, requested,
        [m for m, _, _ in groups], [v for _, v, _ in groups], [n for _, _, n in groups],
    )
