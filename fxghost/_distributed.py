"""Ghost batches across processes: ``fxghost.transform(model, g, process_group=pg)``.

With a group of ``k`` processes, each rewritten layer forms its ghost batches from the group's
batches concatenated in rank order (rank within the group), split as the chunked reference splits
one batch (``chunk(ceil(N / g))`` of the ``N`` samples of the group), so a ghost batch may lie in
one process or span several. A *piece* is the part of one ghost batch that lies in one process's
slice: a slice holds consecutive pieces, at most a short one, pieces of the ghost size, and
another short one.

Only per-channel statistics travel, never activations:

- forward: the batch sizes (three ints per process, all-gathered), then each piece's mean and sum
  of squared deviations from it (all-gathered), combined into each ghost batch's mean and variance
  with Chan's parallel formula: exact and stable like a two-pass variance, in one round trip
  instead of two. Every process combines the same gathered values in the same order, so every
  process of the group updates its running statistics identically.
- backward: one all-reduce of the per-ghost-batch sums of ``dy`` and ``dy * xhat``.

Weight and bias gradients are each process's own partial sums, which DDP's averaging (or a
summing all-reduce) combines as for any other parameter.

The layout of ghost batches depends on every process's batch size, known only when the layer
runs, so the cross-process work is three custom ops (``fxghost::group_ghost_stats``,
``group_ghost_norm`` and its backward) that ``torch.compile`` records as single nodes from their
fake implementations, whose shapes depend only on the local input: no graph break, and inductor
calls them as they are. (Functional collectives would need the number of ghost batches, a
function of the other processes' sizes, as a shape at trace time.)

A ``ProcessGroup`` cannot be written into generated code, so the graph names a group by a small
int key registered here (``ghost_norm(..., process_group=1)``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _math, backends
from ._plan import GhostPlan, check_layer_input, chunk_split
from .backends._common import Scratch, define_op, param_dtypes, param_grads

__all__ = [
    "LAST_LAYOUT_ATTR",
    "NO_GROUP",
    "GroupRef",
    "GroupSplit",
    "check_input",
    "ghost_norm",
    "group_split",
    "last_layout",
    "register",
    "size_of",
]

# Key -> group. Strong references: ProcessGroup objects do not take weak ones, and a group lives
# as long as the process uses torch.distributed anyway.
_GROUPS: dict[int, dist.ProcessGroup] = {}

#: The attribute of a layer holding its last batch's sizes per process and ghost size (what the
#: report's layout column describes): state of the layer, copied and pickled with it.
LAST_LAYOUT_ATTR = "_fxghost_last_layout"
_NOT_RECORDED = "(not recorded under torch.compile)"


class GroupRef(NamedTuple):
    """How the pass refers to a ``transform(process_group=...)`` group. ``key``: the int the
    graph passes to the ghost ops as their ``process_group`` argument, ``None`` where calls do
    not communicate; ``size``: the group's number of processes, for the report (``None``
    without a group)."""

    key: int | None = None
    size: int | None = None


#: No process group: each process forms ghost batches of its own batch.
NO_GROUP = GroupRef()


def register(process_group: object) -> GroupRef:
    """The :class:`GroupRef` of a ``transform(process_group=...)`` argument: :data:`NO_GROUP`
    for ``None``; no key and size 1 for a group of one process, which needs no communication
    (its layers behave as without a group); else the key the graph names the group by."""
    if process_group is None:
        return NO_GROUP
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "fxghost: process_group must be a torch.distributed.ProcessGroup that this process "
            f"belongs to, got {process_group!r}; with torch.distributed.new_subgroups(k) each "
            "process passes the group it returns (new_group returns a placeholder to processes "
            "outside the group)"
        )
    if dist.get_rank(process_group) < 0:
        raise ValueError(
            "fxghost: this process is not a member of process_group; pass each process the "
            "group it belongs to (torch.distributed.new_subgroups returns it)"
        )
    size = dist.get_world_size(process_group)
    if size == 1:
        return GroupRef(None, 1)
    for key, known in _GROUPS.items():
        if known is process_group:
            return GroupRef(key, size)
    key = len(_GROUPS) + 1
    _GROUPS[key] = process_group
    return GroupRef(key, size)


def size_of(key: int | None) -> int | None:
    """The size of the group a graph names by ``key`` (for the report)."""
    return None if key is None or key not in _GROUPS else _GROUPS[key].size()


def _group(key: int, label: str) -> dist.ProcessGroup:
    try:
        return _GROUPS[key]
    except KeyError:
        raise ValueError(
            f"fxghost: layer {label} was rewritten with a process group (key {key}) that this "
            "process does not know (a model pickled in another process?); transform the model "
            "again with process_group="
        ) from None


def last_layout(layer: nn.Module | None) -> str:
    """How ``layer``'s last batch was laid out in ghost batches (``""`` before any)."""
    recorded = None if layer is None else layer.__dict__.get(LAST_LAYOUT_ATTR)
    if recorded is None:
        return ""
    if isinstance(recorded, str):
        return recorded
    sizes, g = recorded
    return group_split(tuple(sizes), g).describe()


def _record_layout(layer: nn.Module, sizes: Tensor, g: int) -> None:
    if torch.compiler.is_compiling():
        # The sizes are known only when the compiled code runs; reading them there would break
        # the graph, so the compiled model says it does not record them.
        backends.set_while_tracing(layer, LAST_LAYOUT_ATTR, _NOT_RECORDED)
    else:
        layer.__dict__[LAST_LAYOUT_ATTR] = (tuple(sizes.tolist()), g)


@dataclass(frozen=True)
class GroupSplit:
    """The ghost batches of a group's concatenated batch, and where each process's slice lies."""

    sizes: tuple[int, ...]
    plan: GhostPlan

    @property
    def ghosts(self) -> int:
        return self.plan.full + (1 if self.plan.tail else 0)

    def samples(self, ghost: int) -> int:
        return self.plan.size if ghost < self.plan.full else self.plan.tail

    @functools.cached_property
    def pieces(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """Per rank: the first ghost batch its slice touches and the lengths of its pieces."""
        out = []
        start, size = 0, self.plan.size
        for n in self.sizes:
            end = start + n
            first, lengths = start // size, []
            for j in range(first, (end + size - 1) // size if n else first):
                lengths.append(min((j + 1) * size, end) - max(j * size, start))
            out.append((first, tuple(lengths)))
            start = end
        return tuple(out)

    def describe(self) -> str:
        """E.g. ``N=8 (3+5): 4 on ranks 0-1, 4 on rank 1``."""
        ranks: list[list[int]] = [[] for _ in range(self.ghosts)]
        for r, (first, lengths) in enumerate(self.pieces):
            for j in range(first, first + len(lengths)):
                ranks[j].append(r)
        parts = [
            f"{self.samples(j)} on rank {rs[0]}"
            if len(rs) == 1
            else f"{self.samples(j)} on ranks {rs[0]}-{rs[-1]}"
            for j, rs in enumerate(ranks[:6])
        ]
        more = f", ... ({self.ghosts} ghost batches)" if self.ghosts > 6 else ""
        return f"N={sum(self.sizes)} ({'+'.join(map(str, self.sizes))}): {', '.join(parts)}{more}"


@functools.lru_cache(maxsize=256)
def group_split(sizes: tuple[int, ...], g: int) -> GroupSplit:
    total = sum(sizes)
    # No samples anywhere (eval without running statistics): no ghost batch, no piece.
    return GroupSplit(sizes, chunk_split(total, g) if total else GhostPlan(0, 1, 0, 0))


@functools.lru_cache(maxsize=256)
def _combine_index(
    sizes: tuple[int, ...], g: int, rows: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ghost, rank, row of the gathered pieces, samples) of every piece of the group: where
    each gathered piece goes in a dense (ghost batch, rank) table. A piece is the only one of
    its rank in its ghost batch, so the table is filled without accumulating (deterministic,
    and the same on every process)."""
    ghost, rank, row, count = [], [], [], []
    for r, (first, lengths) in enumerate(group_split(sizes, g).pieces):
        for s, length in enumerate(lengths):
            ghost.append(first + s)
            rank.append(r)
            row.append(r * rows + s)
            count.append(length)
    return tuple(torch.tensor(t, device=device) for t in (ghost, rank, row, count))  # type: ignore[return-value]


def _capacity(n: int, g: int) -> int:
    """How many pieces a slice of ``n`` samples can hold, from ``n`` and ``g`` alone (a shape the
    fake implementations can give): ghost batches hold more than ``g / 2`` samples when the
    group's ``N >= g``, and there is one ghost batch when ``N < g``."""
    half = g // 2 + 1
    return (n + half - 1) // half + 1


def _runs(lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive equal lengths as ``(length, count)``: at most three runs for a slice."""
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    return runs


def _piece_sums(t: Tensor, lengths: tuple[int, ...]) -> Tensor:
    """Sums of ``t`` ``(n, ...)`` over its consecutive pieces: ``(len(lengths), ...)``."""
    out, start = [], 0
    for length, count in _runs(lengths):
        part = t[start : start + length * count]
        out.append(part.reshape(count, length, *t.shape[1:]).sum(1))
        start += length * count
    return torch.cat(out) if out else t.new_zeros((0, *t.shape[1:]))


def _piece_stats(xs: Tensor, lengths: tuple[int, ...], counts: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and sum of squared deviations from it, per channel, of each piece of ``xs``
    ``(n, C, *spatial)`` holding ``counts`` values per channel: ``(pieces, C)`` each. Two
    passes (stable); the reductions over the spatial dims come first, into ``(n, C)``, then
    over the pieces. (Not var_mean, whose CPU kernel takes tens of times longer than a sum.)"""
    mean = _piece_sums(_per_channel(xs), lengths) / counts
    view = [xs.shape[0], xs.shape[1]] + [1] * (xs.dim() - 2)
    centred = torch.sub(xs, _per_sample(mean, lengths).view(view), out=_temporary(xs))
    return mean, _piece_sums(_per_channel(centred.square_()), lengths)


_scratch = Scratch()


def _temporary(like: Tensor) -> Tensor:
    """A full-size temporary laid out as ``like`` (channels_last or contiguous), reusing one
    buffer per thread on the CPU, where fresh memory costs page faults (see :class:`Scratch`).
    Only for values that die inside the op that asks for it."""
    if like.device.type != "cpu":
        return torch.empty_like(like)
    if (
        like.dim() in (4, 5)
        and not like.is_contiguous()
        and like.is_contiguous(
            memory_format=torch.channels_last if like.dim() == 4 else torch.channels_last_3d
        )
    ):
        order = (0, *range(2, like.dim()), 1)
        back = (0, like.dim() - 1, *range(1, like.dim() - 1))
        return _scratch.like(like.permute(order)).permute(back)
    return _scratch.like(like)


def _per_sample(stats: Tensor, lengths: tuple[int, ...]) -> Tensor:
    """Per-piece ``(pieces, C)`` values repeated for each sample of their piece: ``(n, C)``."""
    out, start = [], 0
    for length, count in _runs(lengths):
        out.append(stats[start : start + count].repeat_interleave(length, dim=0))
        start += count
    return torch.cat(out) if out else stats[:0]


def _spatial(x: Tensor) -> list[int]:
    return list(range(2, x.dim()))


def _per_channel(t: Tensor) -> Tensor:
    """``(n, C, *spatial)`` summed over the spatial dims: ``(n, C)``."""
    return t.sum(_spatial(t)) if t.dim() > 2 else t


def _all_gather(out: Tensor, mine: Tensor, group: dist.ProcessGroup) -> None:
    # all_gather_single where this torch has it (it deprecates all_gather_into_tensor).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def _header(x: Tensor, group: dist.ProcessGroup, ok: bool) -> list[list[int]]:
    """Every process's ``[batch size, values per sample and channel, passed its input checks]``."""
    per_sample = 1
    for d in x.shape[2:]:
        per_sample *= d
    mine = torch.tensor([x.shape[0], per_sample, int(ok)], dtype=torch.int64, device=x.device)
    out = mine.new_empty(3 * group.size())
    _all_gather(out, mine, group)
    return out.view(-1, 3).tolist()  # type: ignore[no-any-return]


def check_input(layer: nn.Module, name: str, x: Tensor, key: int) -> None:
    """The local input checks of a training call. A process whose input fails them tells the
    group, which is waiting for its batch size, before raising: the others then raise too
    instead of waiting until the collective times out. (Under torch.compile the checks run
    while tracing, and the error stays on that process.)"""
    try:
        check_layer_input(layer, name, x)
    except (ValueError, TypeError):
        if not torch.compiler.is_compiling():
            _header(x, _group(key, f"'{name}'"), ok=False)
        raise


def _group_sizes(x: Tensor, group: dist.ProcessGroup, label: str) -> tuple[tuple[int, ...], int]:
    """Every process's batch size, and the values per sample and channel, which all processes
    must share; raises where a process failed its input checks (:func:`check_input`)."""
    header = _header(x, group, ok=True)
    failed = [r for r, (_, _, ok) in enumerate(header) if not ok]
    if failed:
        raise ValueError(
            f"fxghost: layer {label}: process(es) {failed} of its process group (ranks within "
            "the group) failed fxghost's input checks, and their errors say why; nothing was "
            "updated"
        )
    per_sample = header[0][1]
    if any(h[1] != per_sample for h in header):
        raise ValueError(
            f"fxghost: layer {label} got inputs with {[h[1] for h in header]} values per sample "
            "and channel in the processes of its group; ghost batches across processes need "
            "samples of one shape (the group's batches are concatenated)"
        )
    return tuple(h[0] for h in header), per_sample


class _StatsCall(NamedTuple):
    """The arguments of ``fxghost::group_ghost_stats``, in its schema's order: what its
    implementation and its fake implementation read."""

    x: Tensor
    #: The buffers to update in place (``None``: no update).
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    momentum: float | None
    eps: float
    g: int
    key: int
    training: bool
    #: The layer, as errors name it.
    label: str


def _group_stats(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Each local piece's ghost-batch mean and ``rstd`` (``(capacity, C)``, padded), and the
    group's batch sizes (``(k,)`` int64 on the CPU); updates the running statistics, when given,
    with every ghost batch of the group. ``args``: a :class:`_StatsCall`."""
    call = _StatsCall(*args)
    x, g, label = call.x, call.g, call.label
    group = _group(call.key, label)
    sizes, per_sample = _group_sizes(x, group, label)
    total = sum(sizes)
    sizes_text = f"{'+'.join(map(str, sizes))} in the processes of its group"
    if call.training and 0 < total < g:
        raise ValueError(
            f"fxghost: layer {label} got a training batch of N={total} samples ({sizes_text}), "
            f"smaller than ghost_batch_size={g}. Ghost BatchNorm needs at least one full ghost "
            f"batch in training: feed the group at least {g} samples, use a smaller "
            "ghost_batch_size, or a larger process group."
        )
    dtype = _math.stat_dtype(x.dtype)
    channels = x.shape[1]
    capacity = _capacity(x.shape[0], g)
    sizes_tensor = torch.tensor(sizes, dtype=torch.int64)
    if total == 0:  # every process's batch is empty: no ghost batch, nothing to update
        empty = x.new_zeros((capacity, channels), dtype=dtype)
        return empty, empty.clone(), sizes_tensor
    split = group_split(sizes, g)
    plan = split.plan
    smallest = plan.tail if plan.tail else plan.size
    if smallest * per_sample == 1:
        shape = f"{plan.full} of {plan.size}" + (f" and one of {plan.tail}" if plan.tail else "")
        raise ValueError(
            f"fxghost: layer {label}: N={total} ({sizes_text}) with ghost_batch_size={g} forms "
            f"ghost batches of {shape} sample(s), and one of them has a single value per "
            "channel, which BatchNorm cannot normalize. Use batch sizes that leave at least 2 "
            "samples in the last ghost batch (e.g. a multiple of the ghost size), or a larger "
            "ghost_batch_size."
        )

    # This process's pieces: mean, and squared deviations from it.
    first, lengths = split.pieces[dist.get_rank(group)]
    counts = torch.tensor(lengths, dtype=dtype, device=x.device).unsqueeze(1) * per_sample
    piece_mean, piece_m2 = _piece_stats(_math.cast(x, dtype), lengths, counts)

    # Every process's pieces, gathered; combined per ghost batch with Chan's formula.
    rows = max(len(p) for _, p in split.pieces)
    mine = piece_mean.new_zeros((rows, 2, channels))
    mine[: len(lengths), 0] = piece_mean
    mine[: len(lengths), 1] = piece_m2
    gathered = mine.new_empty((group.size() * rows, 2, channels))
    _all_gather(gathered, mine, group)
    ghost, ranks, row, count = _combine_index(sizes, g, rows, x.device)
    table = mine.new_zeros((split.ghosts, group.size(), 2, channels))
    table[ghost, ranks] = gathered[row]
    weight = mine.new_zeros((split.ghosts, group.size(), 1))
    weight[ghost, ranks] = (count * per_sample).to(dtype).unsqueeze(1)
    n_ghost = weight.sum(1)  # (G, 1)
    mean = (table[:, :, 0] * weight).sum(1) / n_ghost
    m2 = (table[:, :, 1] + weight * (table[:, :, 0] - mean.unsqueeze(1)).square()).sum(1)
    var = m2 / n_ghost
    rstd = torch.rsqrt(var + call.eps)

    if call.running_mean is not None and call.running_var is not None:
        stats = [(mean[: plan.full], var[: plan.full], plan.size * per_sample)]
        if plan.tail:
            stats.append((mean[plan.full :], var[plan.full :], plan.tail * per_sample))
        _math.update_running_stats(
            call.running_mean,
            call.running_var,
            call.num_batches_tracked,
            call.momentum,
            plan.requested,
            stats,
            compiling=False,
        )

    mine_mean = x.new_zeros((capacity, channels), dtype=dtype)
    mine_rstd = torch.ones_like(mine_mean)
    mine_mean[: len(lengths)] = mean[first : first + len(lengths)]
    mine_rstd[: len(lengths)] = rstd[first : first + len(lengths)]
    return mine_mean, mine_rstd, sizes_tensor


def _group_stats_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
    call = _StatsCall(*args)
    x = call.x
    shape = (_capacity(x.shape[0], call.g), x.shape[1])
    dtype = _math.stat_dtype(x.dtype)
    size = _group(call.key, call.label).size()
    return (
        x.new_empty(shape, dtype=dtype),
        x.new_empty(shape, dtype=dtype),
        torch.empty(size, dtype=torch.int64),
    )


def _local(
    sizes: Tensor, g: int, key: int
) -> tuple[GroupSplit, dist.ProcessGroup, int, tuple[int, ...]]:
    """The split :func:`_group_stats` found, this process's group, first ghost batch and pieces."""
    group = _group(key, f"(process group key {key})")
    split = group_split(tuple(sizes.tolist()), g)
    first, lengths = split.pieces[dist.get_rank(group)]
    return split, group, first, lengths


def _coefficients(
    x: Tensor, piece_mean: Tensor, piece_rstd: Tensor, lengths: tuple[int, ...]
) -> tuple[Tensor, Tensor, list[int]]:
    """Each sample's ghost-batch mean and rstd, shaped to broadcast against ``x``."""
    view = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
    pieces = len(lengths)
    mean = _per_sample(piece_mean[:pieces], lengths).view(view)
    rstd = _per_sample(piece_rstd[:pieces], lengths).view(view)
    return mean, rstd, view


def _affine(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``x * a + b`` with per-sample coefficients, computed in their dtype, returned in ``x``'s
    laid out as ``empty_like(x)``: what the fake implementations promise inductor (a non-dense
    ``x`` would otherwise give other strides)."""
    out = torch.empty_like(x)
    if x.dtype == a.dtype:
        # Plain mul and add_ with broadcast operands, in place: they vectorize on the CPU.
        torch.mul(x, a, out=out).add_(b)
    else:
        out.copy_(x.to(a.dtype).mul_(a).add_(b))
    return out


def _group_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    piece_mean: Tensor,
    piece_rstd: Tensor,
    sizes: Tensor,
    g: int,
    key: int,
    label: str,
) -> Tensor:
    """``x`` normalized with its ghost batches' statistics from :func:`_group_stats`."""
    _, _, _, lengths = _local(sizes, g, key)
    mean, rstd, view = _coefficients(x, piece_mean, piece_rstd, lengths)
    # scale and shift per sample, as _math builds them per ghost batch (a sample is a group).
    grouped = [x.shape[0], 1, *view[1:]]
    scale, shift = _math.scale_shift(mean.view(grouped), rstd.view(grouped), weight, bias)
    return _affine(x, scale.view(view), shift.view(view))


def _group_norm_fake(x: Tensor, *_: Any) -> Tensor:
    return torch.empty_like(x)


def _group_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    piece_mean: Tensor,
    piece_rstd: Tensor,
    sizes: Tensor,
    g: int,
    key: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``: BatchNorm's backward per ghost batch, with each ghost batch's
    sums of ``dy`` and ``dy * xhat`` all-reduced over the group; ``dweight`` and ``dbias`` are
    this process's partial sums, ``(C,)`` in the statistics dtype."""
    split, group, first, lengths = _local(sizes, g, key)
    dtype = piece_mean.dtype
    mean, rstd, view = _coefficients(x, piece_mean, piece_rstd, lengths)
    xs, grad = _math.cast(x, dtype), _math.cast(dy, dtype)
    dx = torch.empty_like(x)
    # x - mean, in dx's memory when that holds the statistics dtype: dx is computed over it.
    centred = torch.sub(xs, mean, out=dx if xs is x else None)
    sum_dy = _per_channel(grad)  # (n, C)
    # rstd is constant over a sample: applied to the per-sample sums, not to every value.
    tmp = _temporary(centred)
    sum_dy_xhat = _per_channel(torch.mul(centred, grad, out=tmp)) * rstd.view(sum_dy.shape)
    local = _piece_sums(torch.stack([sum_dy, sum_dy_xhat], 1), lengths)  # (pieces, 2, C)
    totals = local.new_zeros((split.ghosts, 2, x.shape[1]))
    totals[first : first + len(lengths)] = local
    dist.all_reduce(totals, group=group)
    per_sample = 1
    for d in x.shape[2:]:
        per_sample *= d
    counts = torch.tensor(
        [split.samples(first + s) * per_sample for s in range(len(lengths))],
        dtype=dtype,
        device=x.device,
    ).view(-1, 1, 1)
    means = _per_sample(totals[first : first + len(lengths)] / counts, lengths)  # (n, 2, C)
    mean_dy = means[:, 0].reshape(view)
    mean_dy_xhat = means[:, 1].reshape(view)
    k = rstd if weight is None else rstd * _math.cast(weight, dtype).view(1, -1, *view[2:])
    # dx = k * (dy - mean_dy - xhat * mean_dy_xhat) = centred * a + b + k * dy, with per-sample
    # a and b; mul and add_ with broadcast operands, in place, vectorize on the CPU.
    centred.mul_(-k * rstd * mean_dy_xhat).add_(-k * mean_dy).add_(torch.mul(grad, k, out=tmp))
    if centred is not dx:
        dx.copy_(centred)
    return dx, sum_dy_xhat.sum(0), sum_dy.sum(0)


def _group_norm_backward_fake(
    dy: Tensor, x: Tensor, weight: Tensor | None, piece_mean: Tensor, *_: Any
) -> tuple[Tensor, Tensor, Tensor]:
    channels, dtype = x.shape[1], piece_mean.dtype
    return (
        torch.empty_like(x),
        x.new_empty((channels,), dtype=dtype),
        x.new_empty((channels,), dtype=dtype),
    )


_group_stats_op = define_op(
    "group_ghost_stats",
    _group_stats,
    _group_stats_fake,
    "(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor(c!)? num_batches_tracked, float? momentum, float eps, int g, int key, "
    "bool training, str label) -> (Tensor, Tensor, Tensor)",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
_STATS = "Tensor piece_mean, Tensor piece_rstd, Tensor sizes, int g, int key"
_group_norm_op = define_op(
    "group_ghost_norm",
    _group_norm,
    _group_norm_fake,
    f"(Tensor x, Tensor? weight, Tensor? bias, {_STATS}, str label) -> Tensor",
)
_group_backward_op = define_op(
    "group_ghost_norm_backward",
    _group_norm_backward,
    _group_norm_backward_fake,
    f"(Tensor dy, Tensor x, Tensor? weight, {_STATS}) -> (Tensor, Tensor, Tensor)",
)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, bias, piece_mean, piece_rstd, sizes, ctx.g, ctx.key, ctx.label = inputs
    ctx.param_dtypes = param_dtypes(weight, bias)
    ctx.save_for_backward(x, weight, piece_mean, piece_rstd, sizes)


def _backward_rule(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fxghost: layer {ctx.label}: double backward (backward with create_graph=True, "
            "as gradient penalties take) through ghost batches across processes is not "
            "supported. Transform without process_group for it (ghost batches within each "
            "process), or take the second-order term through a model without this layer"
        )
    x, weight, piece_mean, piece_rstd, sizes = ctx.saved_tensors
    dx, dweight, dbias = _group_backward_op(
        dy, x, weight, piece_mean, piece_rstd, sizes, ctx.g, ctx.key
    )
    grad_w, grad_b = param_grads(ctx, dweight, dbias)
    grad_x = dx if ctx.needs_input_grad[0] else None
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


_group_norm_op.register_autograd(_backward_rule, setup_context=_setup)


class _Label(backends.Backend):
    name = "torch"
    label = "torch (process group)"


_IMPLEMENTATION = _Label()


def ghost_norm(x: Tensor, layer: nn.Module, g: int, name: str, key: int) -> Tensor:
    """``layer``'s batch-statistics call on this process's slice ``x`` of the group's batch:
    the output slice, with ``layer``'s running statistics updated (in training) as the chunked
    reference would update them on the concatenated batch."""
    backends.record(layer, _IMPLEMENTATION)
    update = bool(layer.training and layer.track_running_stats and layer.running_mean is not None)
    label = f"'{name}' ({type(layer).__name__})"
    piece_mean, piece_rstd, sizes = _group_stats_op(
        x.detach(),
        layer.running_mean if update else None,
        layer.running_var if update else None,
        layer.num_batches_tracked if update else None,
        layer.momentum,
        layer.eps,
        g,
        key,
        bool(layer.training),
        label,
    )
    _record_layout(layer, sizes, g)
    out = _group_norm_op(x, layer.weight, layer.bias, piece_mean, piece_rstd, sizes, g, key, label)
    return out  # type: ignore[no-any-return]
