"""What the backends share: the :class:`Backend` interface and the arguments its calls take
(:class:`NormParams`, :class:`RunningStatsUpdate`, :class:`Epilogue`), and the helpers of their
implementations."""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _math
from ._dims import dims

__all__ = [
    "Backend",
    "Epilogue",
    "NormParams",
    "RunningStatsUpdate",
    "Scratch",
    "UpdateHook",
    "apply_epilogue",
    "define_op",
    "dense",
    "param_dtypes",
    "param_grads",
    "per_channel",
    "standard",
    "totals",
]

#: What a Function's forward calls with the ``(G, 1, C, 1...)`` mean and biased variance it
#: computed, before it returns (and so before autograd saves anything): the running-statistics
#: update of :meth:`Backend.norm`.
UpdateHook = Callable[[Tensor, Tensor], None]


class RunningStatsUpdate(NamedTuple):
    """A training call's running-statistics update: the ghost batches of a batch of
    ``requested`` update the buffers in closed form, one after another, with momentum
    ``momentum / requested`` each (:func:`fxghost._math.update_running_stats`)."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    momentum: float | None
    requested: int


class NormParams(NamedTuple):
    """What a normalization takes from its layer besides the input: the affine ``weight`` and
    ``bias`` (either may be ``None``) and ``eps``."""

    weight: Tensor | None
    bias: Tensor | None
    eps: float


class Epilogue(NamedTuple):
    """What follows the normalization: ``y = relu(norm(x) + residual)``, ``residual`` optional.

    The graph pass fuses a BatchNorm followed by a ReLU, or by a residual add and a ReLU, into
    one ``ghost_norm`` call that passes this to the backend, one per piece of the batch.
    """

    #: The add's other operand, grouped exactly like the ``xg`` it goes with (the same shape,
    #: dtype and device), or ``None`` for a ReLU alone.
    residual: Tensor | None
    #: Whether a ReLU follows (always ``True`` for now).
    relu: bool


def apply_epilogue(y: Tensor, epilogue: Epilogue | None) -> Tensor:
    """``epilogue`` applied in torch ops to ``y``, a backend's sample-first output
    (``xg.flatten(0, 1)``'s shape), which is fresh: in eager mode it is updated in place (the
    Functions save their input, not ``y``), under ``torch.compile`` out of place, for inductor
    to fuse with the normalization."""
    if epilogue is None:
        return y
    residual = None if epilogue.residual is None else epilogue.residual.flatten(0, 1)
    if torch.compiler.is_compiling():
        if residual is not None:
            y = y + residual
        return torch.relu(y) if epilogue.relu else y
    if residual is not None:
        y = y.add_(residual)
    return y.relu_() if epilogue.relu else y


def per_channel(xg: Tensor) -> int:
    """How many values of each channel a ghost batch of the grouped view ``xg`` holds."""
    # A product of sizes, not numel() // (G * C): under torch.compile with dynamic shapes the
    # sizes are symbols, and a product of them simplifies where a division may not.
    return xg.shape[1] * math.prod(xg.shape[3:])


class Backend:
    """How one implementation family runs a layer call. ``name`` is the family, as
    ``transform(backend=...)`` names it; ``label`` says which of its paths this is, for the
    report."""

    name = ""
    label = ""

    #: Whether :meth:`norm` applies an :class:`Epilogue` itself (in its kernels): only then does
    #: :meth:`norm_batch` pass it one; otherwise it applies the epilogue after the
    #: normalization, in torch ops (:func:`apply_epilogue`).
    fuses_epilogues = False

    def norm(
        self,
        xg: Tensor,
        params: NormParams,
        update: RunningStatsUpdate | None = None,
        epilogue: Epilogue | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, var)`` of a grouped view: ``y`` sample-first and not a view, the biased
        variance; statistics ``(G, 1, C, 1...)``. With ``epilogue``, ``y`` is
        ``relu(normalized + residual)`` (the statistics are still the input's). With ``update``,
        these ghost batches, the
        next ones of the batch, update the running statistics before anything is saved for
        backward: under activation checkpointing PyTorch ends the recomputation as soon as the
        last tensor the backward needs is saved again (its default early stop), and an update
        after that would run in the forward but not in the recomputation, where each
        BatchNorm call of the chunked reference updates again."""
        raise NotImplementedError

    #: Whether :meth:`norm_batch` makes one running-statistics update for all of a batch's
    #: ghost batches, after normalizing them (a traced backend: one node in dynamo's graph).
    one_update_per_batch = False

    def norm_batch(
        self,
        main: Tensor,
        tail: Tensor | None,
        params: NormParams,
        update: RunningStatsUpdate | None,
        epilogue: tuple[Epilogue | None, Epilogue | None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """A batch's ``(y_main, y_tail)``: :meth:`norm` of its whole ghost batches ``main``,
        then of its shorter last one ``tail`` when there is one, each updating the running
        statistics with its own ghost batches, as the reference's BatchNorm calls do one after
        another (or, with :attr:`one_update_per_batch`, both in one update at the end).
        ``epilogue``: ``main``'s and ``tail``'s, each residual grouped like its piece; passed to
        :meth:`norm` where it :attr:`fuses_epilogues`, else applied after it
        (:func:`apply_epilogue`)."""
        main_epilogue, tail_epilogue = (None, None) if epilogue is None else epilogue
        if not self.one_update_per_batch:
            y_main = self._norm_piece(main, params, update, main_epilogue)[0]
            if tail is None:
                return y_main, None
            return y_main, self._norm_piece(tail, params, update, tail_epilogue)[0]
        y_main, mean, var = self._norm_piece(main, params, None, main_epilogue)
        groups = [(mean, var, per_channel(main))]
        y_tail = None
        if tail is not None:
            y_tail, mean_t, var_t = self._norm_piece(tail, params, None, tail_epilogue)
            groups.append((mean_t, var_t, per_channel(tail)))
        if update is not None:
            self.update_running_stats(update, groups)
        return y_main, y_tail

    def _norm_piece(
        self,
        xg: Tensor,
        params: NormParams,
        update: RunningStatsUpdate | None,
        epilogue: Epilogue | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`norm` of one piece with its ``epilogue``: in :meth:`norm` where the backend
        :attr:`fuses_epilogues`, else after it."""
        if epilogue is None:
            return self.norm(xg, params, update)
        if self.fuses_epilogues:
            return self.norm(xg, params, update, epilogue=epilogue)
        y, mean, var = self.norm(xg, params, update)
        return apply_epilogue(y, epilogue), mean, var

    def apply_update(
        self, update: RunningStatsUpdate, count: int, mean: Tensor, var: Tensor
    ) -> None:
        """``update`` with the statistics ``(G, 1, C, 1...)`` of its next ghost batches, of
        ``count`` values per channel each."""
        self.update_running_stats(update, [(mean, var, count)])

    def update_hook(self, update: RunningStatsUpdate | None, xg: Tensor) -> UpdateHook | None:
        """:meth:`apply_update` of ``update`` for the ghost batches ``xg``, as the
        :data:`UpdateHook` of a Function's forward."""
        if update is None:
            return None
        return functools.partial(self.apply_update, update, per_channel(xg))

    #: What :meth:`update_running_stats` passes to :func:`fxghost._math.update_running_stats`:
    #: whether it runs under a trace, and a family's kernel for the weighted sums.
    traced_update = False
    accumulate: _math.Accumulate | None = None

    def update_running_stats(
        self, update: RunningStatsUpdate, groups: Sequence[tuple[Tensor, Tensor, int]]
    ) -> None:
        """:func:`fxghost._math.update_running_stats` of ``update`` with ``groups``, its
        ``(mean, biased_var, count)`` per group of equal-sized ghost batches."""
        # RunningStatsUpdate's fields are update_running_stats' first arguments, in order.
        _math.update_running_stats(
            *update, groups, compiling=self.traced_update, accumulate=self.accumulate
        )

    def __repr__(self) -> str:
        return f"<fxghost backend {self.label}>"


class Scratch(threading.local):
    """One reusable buffer per thread for full-size temporaries on CPU.

    glibc hands large freed blocks back to the OS, so on CPU every fresh full-size tensor pays
    page faults on first touch (four live 4 MB temporaries cost 6.5 ms instead of 0.5 ms).
    Reusing one buffer for the temporaries that die inside an op avoids that; it costs one
    activation-sized buffer per thread. CUDA has a caching allocator and does not need this.
    """

    def __init__(self) -> None:
        self.buf: Tensor | None = None

    def like(self, t: Tensor) -> Tensor:
        if t.device.type != "cpu":
            return torch.empty_like(t, memory_format=torch.contiguous_format)
        n = t.numel()
        buf = self.buf
        if buf is None or buf.numel() < n or buf.dtype != t.dtype:
            buf = self.buf = torch.empty(n, dtype=t.dtype)
        return buf[:n].view(t.shape)


def standard(stat: Tensor, shape: Sequence[int]) -> Tensor:
    """``stat`` holding ``(G, C)`` values, shaped ``(G, 1, C, 1...)`` for a grouped ``shape``."""
    return stat.reshape(shape[0], 1, shape[2], *([1] * (len(shape) - 3)))


def param_dtypes(
    weight: Tensor | None, bias: Tensor | None
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """What :func:`param_grads` needs to know of the parameters (a Function keeps the bias's
    dtype, not the bias: its value plays no part in the backward)."""
    return (None if weight is None else weight.dtype), (None if bias is None else bias.dtype)


def param_grads(
    ctx: Any, dweight: Tensor | None, dbias: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Weight and bias gradients from the ``(C,)`` totals, in the parameters' dtypes
    (``ctx.param_dtypes``, from :func:`param_dtypes`); ``None`` for a parameter that is missing
    or needs none."""
    needs_w, needs_b = ctx.needs_input_grad[1:3]
    w_dtype, b_dtype = ctx.param_dtypes
    return (
        _math.cast(dweight, w_dtype) if needs_w and dweight is not None else None,
        _math.cast(dbias, b_dtype) if needs_b and dbias is not None else None,
    )


def totals(sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
    """``(dweight, dbias)``: per-(group, channel) sums, in any shape holding ``(G, C)``, summed
    over the groups."""
    return sum_dy_xhat.sum(0).flatten(), sum_dy.sum(0).flatten()


def define_op(
    name: str,
    impl: Callable[..., Any],
    fake: Callable[..., Any],
    schema: str,
    *,
    mutates_args: tuple[str, ...] = (),
    device_types: tuple[str, ...] | None = None,
) -> Any:
    """The custom op ``fxghost::<name>`` with this ``schema``, running ``impl``, and ``fake``
    for torch.compile's fake tensors."""
    op = torch.library.custom_op(
        f"fxghost::{name}",
        impl,
        mutates_args=mutates_args,
        device_types=device_types,
        schema=schema,
    )
    op.register_fake(fake)
    return op


def dense(xg: Tensor) -> Tensor:
    """``xg``, or a contiguous copy when it is not laid out as the kernels read (a slice; or a
    layout that compiled code hands over and its trace did not see)."""
    return xg if dims(xg) is not None else xg.contiguous()
