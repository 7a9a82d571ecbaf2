"""The loader arithmetic that ``fxghost.lightning`` and ``fxghost.composer`` check a training
loader with before the first step (``fxghost._loader``), against what real ``DataLoader``\\ s
with real ``DistributedSampler``\\ s yield on every rank: no expected value is written down."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)

from fxghost._loader import (
    LoaderShape,
    check_batches,
    last_batch_size,
    loader_shape,
    smallest_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")

LENGTHS = [1, 2, 7, 31, 32, 33, 64, 100, 200]
BATCHES = [1, 3, 8, 32]
WORLDS = [1, 2, 3, 8]
BOOLS = [False, True]


def loader(
    n: int, batch: int, drop_last: bool, world: int, sampler_drop_last: bool, rank: int
) -> DataLoader:
    dataset = torch.arange(n)
    sampler = DistributedSampler(
        dataset,  # type: ignore[arg-type]
        num_replicas=world,
        rank=rank,
        shuffle=False,
        drop_last=sampler_drop_last,
    )
    return DataLoader(dataset, batch_size=batch, drop_last=drop_last, sampler=sampler)  # type: ignore[arg-type]


def sizes(batches: DataLoader) -> list[int]:
    return [len(b) for b in batches]


@functools.cache
def real_sizes(
    n: int, batch: int, drop_last: bool, world: int, sampler_drop_last: bool, rank: int
) -> tuple[int, ...]:
    """The sizes of the batches that rank gets in an epoch (iterated once per module)."""
    return tuple(sizes(loader(n, batch, drop_last, world, sampler_drop_last, rank)))


def pieces(batches: tuple[int, ...], microbatch: int) -> list[int]:
    """What Tensor.split(microbatch), as Composer splits a batch, makes of these batches."""
    return [len(p) for b in batches for p in torch.empty(b).split(microbatch)]


def grid() -> Iterator[tuple[int, int, bool, int, bool]]:
    return itertools.product(LENGTHS, BATCHES, BOOLS, WORLDS, BOOLS)


def test_last_batch_size_is_every_ranks_last_batch() -> None:
    checked = 0
    for n, batch, drop_last, world, sampler_drop_last in grid():
        expected = last_batch_size(
            n, batch, drop_last=drop_last, world_size=world, sampler_drop_last=sampler_drop_last
        )
        for rank in range(world):
            got = real_sizes(n, batch, drop_last, world, sampler_drop_last, rank)
            case = (n, batch, drop_last, world, sampler_drop_last, rank)
            assert (got[-1] if got else 0) == expected, case
            checked += 1
    assert checked == len(LENGTHS) * len(BATCHES) * 2 * sum(WORLDS) * 2


def test_loader_shape_reads_real_loaders() -> None:
    for n, batch, drop_last, world, sampler_drop_last in grid():
        for rank in range(world):
            real = loader(n, batch, drop_last, world, sampler_drop_last, rank)
            shape = loader_shape(real)
            assert shape == LoaderShape(n, batch, drop_last, world, sampler_drop_last)
            got = real_sizes(n, batch, drop_last, world, sampler_drop_last, rank)
            assert shape is not None and shape.num_batches == len(got) == len(real)
            assert smallest_batch(shape) == min(got, default=0)

    # Without a DistributedSampler: the sampler's length, whatever draws the samples.
    dataset = torch.arange(50)
    for real in [
        DataLoader(dataset, batch_size=16),  # type: ignore[arg-type]
        DataLoader(dataset, batch_size=16, shuffle=True),  # type: ignore[arg-type]
        DataLoader(Subset(dataset, range(37)), batch_size=16),  # type: ignore[arg-type]
        DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 16, False)),  # type: ignore[arg-type]
        DataLoader(dataset, sampler=RandomSampler(dataset, num_samples=21), batch_size=8),  # type: ignore[arg-type]
    ]:
        shape = loader_shape(real)
        assert shape is not None
        assert (shape.last, shape.num_batches) == (sizes(real)[-1], len(sizes(real)))


class Stream(IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.arange(10))


class Buckets(BatchSampler):
    """Batches of its own sizes: a subclass the arithmetic does not describe."""

    def __iter__(self) -> Iterator[list[int]]:
        yield from ([0, 1, 2], [3])


def test_loaders_without_the_arithmetic_are_not_described() -> None:
    dataset = torch.arange(10)
    assert loader_shape(DataLoader(Stream(), batch_size=4)) is None
    sampler = Buckets(SequentialSampler(dataset), 3, False)
    assert loader_shape(DataLoader(dataset, batch_sampler=sampler)) is None  # type: ignore[arg-type]
    assert loader_shape(DataLoader(dataset, batch_size=None)) is None  # type: ignore[arg-type]
    assert loader_shape([torch.zeros(4, 3)]) is None


@pytest.mark.parametrize("microbatch", [1, 5, 8, 12, 31, 32, 40])
def test_smallest_microbatch_is_what_tensor_split_gives(microbatch: int) -> None:
    # Composer splits each batch with Tensor.split(device_train_microbatch_size).
    for n, batch, drop_last, world, sampler_drop_last in grid():
        shape = LoaderShape(n, batch, drop_last, world, sampler_drop_last)
        for rank in range(world):
            got = pieces(
                real_sizes(n, batch, drop_last, world, sampler_drop_last, rank), microbatch
            )
            assert smallest_batch(shape, microbatch) == min(got, default=0)


def suggested(message: str, name: str) -> int | None:
    found = re.search(
        rf"a {name} (?:whose last batch holds at least \d+ samples \(e\.g\. |of )(\d+)", message
    )
    return None if found is None else int(found.group(1))


@pytest.mark.parametrize("g", [2, 4, 16, 33])
def test_check_raises_exactly_when_a_batch_is_short_and_its_fixes_work(g: int) -> None:
    tried = {"raised": 0, "drop_last": 0, "batch_size": 0}
    for n, batch, drop_last, world, sampler_drop_last in grid():
        shape = LoaderShape(n, batch, drop_last, world, sampler_drop_last)
        got = [real_sizes(n, batch, drop_last, world, sampler_drop_last, r) for r in range(world)]
        smallest = min((s for rank in got for s in rank), default=0)
        if smallest == 0 or smallest >= g:
            check_batches(shape, g, owner="GhostBatchNorm", layers=2)
            continue
        with pytest.raises(ValueError) as raised:
            check_batches(shape, g, owner="GhostBatchNorm", layers=2)
        message = str(raised.value)
        tried["raised"] += 1
        assert f"ghost_batch_size={g}" in message and "2 BatchNorm layer(s)" in message
        assert f"{n} samples" in message and f"batch_size={batch}" in message
        assert f"drop_last={drop_last}" in message
        assert f"ghost_batch_size of at most {smallest}" in message
        if "drop_last=True to the DataLoader" in message:
            fixed = real_sizes(n, batch, True, world, sampler_drop_last, 0)
            assert fixed and min(fixed) >= g
            tried["drop_last"] += 1
        size = suggested(message, "batch_size")
        if size is not None:
            for rank in range(world):
                fixed = sizes(loader(n, size, drop_last, world, sampler_drop_last, rank))
                assert min(fixed) >= g, (shape, size)
            tried["batch_size"] += 1
    # drop_last cannot help where even the full batches are smaller than the ghost size.
    assert tried["raised"] and tried["batch_size"], tried
    assert tried["drop_last"] or g > max(BATCHES), tried


def test_check_names_a_microbatch_size_that_works() -> None:
    tried = 0
    for n, batch, drop_last, world, sampler_drop_last in grid():
        shape = LoaderShape(n, batch, drop_last, world, sampler_drop_last)
        real = real_sizes(n, batch, drop_last, world, sampler_drop_last, 0)
        for microbatch, g in itertools.product([1, 3, 5, 12], [2, 4, 6]):
            if min(pieces(real, microbatch), default=g) >= g:
                check_batches(shape, g, owner="o", layers=1, microbatch_size=microbatch)
                continue
            with pytest.raises(ValueError) as raised:
                check_batches(shape, g, owner="o", layers=1, microbatch_size=microbatch)
            message = str(raised.value)
            # Named where it splits the batches, and then the fix it suggests works.
            assert (f"microbatch_size={microbatch}" in message) == (microbatch < batch)
            size = suggested(message, "microbatch_size")
            if size is not None:
                assert min(pieces(real, size)) >= g, (shape, microbatch, size)
                tried += 1
    assert tried


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="batch_size >= 1"):
        last_batch_size(10, 0)
    with pytest.raises(ValueError, match="world_size >= 1"):
        last_batch_size(10, 4, world_size=0)
