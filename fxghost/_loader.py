"""The batches a training loader feeds each process, checked against the ghost size before the
first training step by :mod:`fxghost.lightning` and :mod:`fxghost.composer`.

A training batch smaller than the ghost size raises (as the chunked reference does), but only
when it comes: an epoch's short last batch comes after a whole epoch of training. A loader's
arithmetic tells it in advance, for the loaders whose batches it fixes: a ``DataLoader`` over a
sized dataset with ``batch_size`` (or a plain ``BatchSampler``), sharded or not by a
``DistributedSampler``. Other loaders (a custom batch sampler, an ``IterableDataset``) are not
checked; the per-batch error still applies to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

__all__ = ["LoaderShape", "check_batches", "last_batch_size", "loader_shape", "smallest_batch"]


def samples_per_process(
    num_samples: int, world_size: int = 1, sampler_drop_last: bool = False
) -> int:
    """Samples a ``DistributedSampler`` gives each of ``world_size`` processes in an epoch: all
    get the same count, padded up by repeating samples, or cut down with its ``drop_last``."""
    if sampler_drop_last:
        return num_samples // world_size
    return -(-num_samples // world_size)


def last_batch_size(
    num_samples: int,
    batch_size: int,
    *,
    drop_last: bool = False,
    world_size: int = 1,
    sampler_drop_last: bool = False,
) -> int:
    """Samples in the last batch of an epoch on each process; 0 when a process gets no batch.

    ``num_samples`` is the dataset's length, ``batch_size`` and ``drop_last`` the
    ``DataLoader``'s; ``world_size`` and ``sampler_drop_last`` a ``DistributedSampler``'s
    ``num_replicas`` and ``drop_last`` (the defaults: one process, no sampler).

    >>> last_batch_size(200, 32)  # six batches of 32, then 8
    8
    >>> last_batch_size(200, 32, drop_last=True)
    32
    >>> last_batch_size(200, 32, world_size=3)  # 67 samples per process (one repeated)
    3
    >>> last_batch_size(200, 32, world_size=3, sampler_drop_last=True)  # 66 per process
    2
    >>> last_batch_size(20, 32, drop_last=True)  # fewer samples than a batch: no batch at all
    0
    """
    if num_samples < 0 or batch_size < 1 or world_size < 1:
        raise ValueError(
            f"last_batch_size needs num_samples >= 0, batch_size >= 1 and world_size >= 1, got "
            f"{num_samples}, {batch_size} and {world_size}"
        )
    n = samples_per_process(num_samples, world_size, sampler_drop_last)
    if drop_last:
        return batch_size if n >= batch_size else 0
    return (n - 1) % batch_size + 1 if n else 0


@dataclass(frozen=True)
class LoaderShape:
    """What fixes the sizes of a loader's batches on each process."""

    num_samples: int  # the dataset's length (what a DistributedSampler shards)
    batch_size: int
    drop_last: bool = False
    world_size: int = 1
    sampler_drop_last: bool = False

    @property
    def per_process(self) -> int:
        return samples_per_process(self.num_samples, self.world_size, self.sampler_drop_last)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on each process."""
        n, b = self.per_process, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def last(self) -> int:
        return last_batch_size(
            self.num_samples,
            self.batch_size,
            drop_last=self.drop_last,
            world_size=self.world_size,
            sampler_drop_last=self.sampler_drop_last,
        )

    def describe(self) -> str:
        text = f"{self.num_samples} samples"
        if self.world_size > 1:
            text += f" over {self.world_size} processes, {self.per_process} each"
        return f"{text}, batch_size={self.batch_size}, drop_last={self.drop_last}"


def loader_shape(loader: Any) -> LoaderShape | None:
    """The :class:`LoaderShape` of a training loader, or ``None`` where its batch sizes are not
    the loader's arithmetic (a custom batch sampler, an ``IterableDataset``, an unsized sampler,
    or not a ``DataLoader``)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    batches = loader.batch_sampler
    # Exactly torch's BatchSampler: a subclass (bucketing, say) may form batches of other sizes.
    if type(batches) is not BatchSampler:
        return None
    sampler = batches.sampler
    try:
        if isinstance(sampler, DistributedSampler):
            shape = LoaderShape(
                len(sampler.dataset),  # type: ignore[arg-type]
                batches.batch_size,
                batches.drop_last,
                sampler.num_replicas,
                sampler.drop_last,
            )
            # A subclass that shards otherwise: its own length is what counts, and is not
            # described by the arithmetic, so leave it to the per-batch error.
            return shape if shape.per_process == len(sampler) else None
        return LoaderShape(len(sampler), batches.batch_size, batches.drop_last)  # type: ignore[arg-type]
    except TypeError:  # an unsized sampler or dataset
        return None


def _split(batch: int, microbatch_size: int | None) -> int:
    """The smallest piece of a batch split into microbatches of ``microbatch_size`` (as
    ``Tensor.split`` does, the last piece taking the remainder)."""
    if microbatch_size is None or batch <= microbatch_size:
        return batch
    return batch % microbatch_size or microbatch_size


def smallest_batch(shape: LoaderShape, microbatch_size: int | None = None) -> int:
    """The fewest samples the model gets in one training forward: the last batch, or a full one,
    or with ``microbatch_size`` the smallest microbatch of either; 0 when there is no batch.

    >>> smallest_batch(LoaderShape(200, 32))
    8
    >>> smallest_batch(LoaderShape(200, 32, drop_last=True), microbatch_size=12)  # 12, 12, 8
    8
    """
    last = shape.last
    if last == 0:
        return 0
    sizes = [_split(last, microbatch_size)]
    if shape.per_process >= shape.batch_size:
        sizes.append(_split(shape.batch_size, microbatch_size))
    return min(sizes)


def _nearest(value: int, lowest: int, highest: int, fits: Any) -> int | None:
    """The int in ``[lowest, highest]`` nearest ``value`` (the larger first) for which ``fits``
    holds; ``None`` if none does."""
    for step in range(1, max(value - lowest, highest - value) + 1):
        for candidate in (value + step, value - step):
            if lowest <= candidate <= highest and fits(candidate):
                return candidate
    return None


def check_batches(
    shape: LoaderShape,
    ghost_batch_size: int,
    *,
    owner: str,
    layers: int,
    microbatch_size: int | None = None,
    microbatch_name: str = "microbatch_size",
) -> None:
    """Raise ``ValueError`` naming the sizes and the fixes if a training batch (or microbatch) of
    ``shape`` is smaller than ``ghost_batch_size``, before the first training step instead of at
    that batch.

    >>> check_batches(LoaderShape(200, 32), 8, owner="GhostBatchNorm(8)", layers=3)
    >>> check_batches(LoaderShape(200, 32), 16, owner="GhostBatchNorm", layers=3)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: GhostBatchNorm ghosts 3 BatchNorm layer(s) with ghost_batch_size=16, but ...
    """
    g = ghost_batch_size
    if microbatch_size is not None and microbatch_size >= shape.batch_size:
        microbatch_size = None  # one microbatch per batch: the batch itself
    smallest = smallest_batch(shape, microbatch_size)
    if smallest == 0 or smallest >= g:
        return
    last = shape.last
    full_fits = _split(shape.batch_size, microbatch_size) >= g
    detail = shape.describe()
    if microbatch_size is None and full_fits:
        gives = f"the training loader's last batch of each epoch holds {smallest} sample(s)"
    else:
        piece = "batch" if microbatch_size is None else "microbatch"
        gives = f"the training loader gives a {piece} of {smallest} sample(s)"
        if microbatch_size is not None:
            detail += f", split by {microbatch_name}={microbatch_size}"
        if last != shape.batch_size:
            detail += f"; the last batch of each epoch holds {last}"
    fixes = []
    if full_fits and not shape.drop_last and shape.per_process >= shape.batch_size:
        fixes.append("pass drop_last=True to the DataLoader")
    fixes.append(f"use a ghost_batch_size of at most {smallest}")
    # A size to suggest, only where changing that one setting is enough.
    if microbatch_size is None:
        size = _nearest(
            shape.batch_size,
            g,
            shape.per_process,
            lambda b: smallest_batch(replace(shape, batch_size=b)) >= g,
        )
        if size is not None:
            fixes.append(f"a batch_size whose last batch holds at least {g} samples (e.g. {size})")
    else:
        size = _nearest(
            microbatch_size,
            g,
            shape.batch_size,
            lambda m: smallest_batch(shape, m if m < shape.batch_size else None) >= g,
        )
        if size is not None:
            fixes.append(f"a {microbatch_name} of {size}")
    raise ValueError(
        f"{owner} ghosts {layers} BatchNorm layer(s) with ghost_batch_size={g}, but {gives} "
        f"({detail}), and a training batch smaller than the ghost size raises when it comes. "
        f"Fix: {', or '.join(fixes)}."
    )
