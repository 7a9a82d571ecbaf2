"""The chunked ghost BatchNorm reference: fxghost's specification.

This is the well-known module-surgery implementation (as in MosaicML Composer's GhostBatchNorm):
split the batch with ``x.chunk(ceil(N / g))``, run each chunk through the original BatchNorm with
momentum ``m / ceil(N / g)``, and concatenate. fxghost's graph pass must match it exactly; tests and
benchmarks compare against it.

A training batch of no samples (N=0) forms no ghost batch: its output is plain BatchNorm's (an
empty batch), and nothing is updated, ``num_batches_tracked`` included (plain BatchNorm counts an
empty batch as one; here it counts ghost batches).

Examples:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> ghost = ChunkedGhostBatchNorm(bn, ghost_batch_size=4)
    >>> ghost(torch.randn(10, 3)).shape
    torch.Size([10, 3])
    >>> int(bn.num_batches_tracked)  # chunks of 4, 4 and 2 samples
    3
    >>> ghost(torch.randn(0, 3)).shape, int(bn.num_batches_tracked)  # no samples: no update
    (torch.Size([0, 3]), 3)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._plan import check_ghost_batch_size, plan_ghost_batches, uses_batch_stats
from ._select import LayerSelector, rule_for

__all__ = ["ChunkedGhostBatchNorm", "apply_chunked_ghost_batchnorm"]


class ChunkedGhostBatchNorm(nn.Module):
    """Ghost BatchNorm by chunking: wraps an existing BatchNorm (whose parameters and buffers it
    uses and updates) and feeds it the ghost batches one at a time.

    Args:
        bn: the BatchNorm layer to run on each ghost batch (``nn.BatchNorm1d/2d/3d``, or a class
            taught with [`fxghost.register_batchnorm`][fxghost.register_batchnorm]).
        ghost_batch_size: samples per ghost batch, a positive int.
        name: the layer's name in error messages (default: ``bn``'s class name).

    Attributes:
        bn: the wrapped layer (its ``state_dict`` keys gain a ``.bn`` level).
        ghost_batch_size: samples per ghost batch.
        name: the layer's name in error messages.

    Raises:
        ValueError: ``ghost_batch_size`` is not a positive int.
    """

    def __init__(self, bn: _BatchNorm, ghost_batch_size: int, name: str | None = None) -> None:
        super().__init__()
        self.bn = bn
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)
        self.name = name if name is not None else type(bn).__name__

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` as the ghost batches of ``x.chunk(ceil(N / g))``, one BatchNorm call
        each with momentum ``m / ceil(N / g)``; in eval mode with running statistics, the
        layer's own eval.

        Args:
            x: the layer's input, ``(N, C, *spatial)``.

        Returns:
            The ghost batches' outputs, concatenated.

        Raises:
            ValueError: ``x``'s dimensions or channels do not fit the layer; or, in training,
                ``x`` holds fewer than ``ghost_batch_size`` samples, or would leave a ghost batch
                with a single value per channel.
            fxghost.InputDtypeError: BatchNorm refuses ``x``'s dtype with the layer's
                parameters and running statistics.
        """
        bn = self.bn
        if not uses_batch_stats(bn):
            return bn(x)
        plan = plan_ghost_batches(bn, self.name, x, self.ghost_batch_size)
        if plan.requested == 0:
            # No samples, no ghost batch: the layer's own output for the empty batch (plain
            # BatchNorm's, differentiable), with nothing updated. track_running_stats=False
            # keeps BatchNorm's forward off its buffers, num_batches_tracked included, which
            # counts ghost batches here (plain BatchNorm would add 1 for an empty batch).
            tracking = bn.track_running_stats
            bn.track_running_stats = False
            try:
                return bn(x)  # type: ignore[no-any-return]
            finally:
                bn.track_running_stats = tracking
        momentum = bn.momentum
        if momentum is not None:
            bn.momentum = momentum / plan.requested
        try:
            outputs = [bn(chunk) for chunk in x.chunk(plan.requested, dim=0)]
        finally:
            bn.momentum = momentum
        return torch.cat(outputs, dim=0)

    def extra_repr(self) -> str:
        return f"ghost_batch_size={self.ghost_batch_size}"


def apply_chunked_ghost_batchnorm(
    model: nn.Module, ghost_batch_size: int, *, only: Iterable[str] | None = None
) -> nn.Module:
    """Replace, in place, every exact ``nn.BatchNorm1d/2d/3d`` or registered BatchNorm-like layer
    ([`fxghost.register_batchnorm`][fxghost.register_batchnorm]) in ``model`` (or those named by
    ``only``) with a [`ChunkedGhostBatchNorm`][fxghost.reference.ChunkedGhostBatchNorm] wrapping
    it, and return ``model`` (or the wrapper, when ``model`` is itself a BatchNorm).

    Module surgery: parameters are kept, but state_dict keys gain a ``.bn`` level.

    Args:
        model: the module whose BatchNorm layers to wrap (it may itself be one).
        ghost_batch_size: samples per ghost batch, a positive int.
        only: qualified layer names or glob patterns to wrap (default: all).

    Returns:
        ``model``, or the wrapper when ``model`` is itself a BatchNorm.

    Raises:
        ValueError: ``ghost_batch_size`` is not a positive int, or a name or pattern of
            ``only`` matches no layer.
        TypeError: ``only`` holds something other than strings.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
        >>> model = apply_chunked_ghost_batchnorm(model, ghost_batch_size=4)
        >>> type(model[1]).__name__, "1.bn.running_mean" in model.state_dict()
        ('ChunkedGhostBatchNorm', True)
    """
    g = check_ghost_batch_size(ghost_batch_size)
    names = [n for n, m in model.named_modules() if rule_for(m) is not None]
    selector = LayerSelector(only)
    chosen = [n for n in names if selector.selects(n)]
    selector.check_all_matched(names)
    for name in chosen:
        if not name:  # the model is itself a BatchNorm
            return ChunkedGhostBatchNorm(model, g, name=type(model).__name__)  # type: ignore[arg-type]
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bn = getattr(parent, attr)
        setattr(parent, attr, ChunkedGhostBatchNorm(bn, g, name=name))
    return model
