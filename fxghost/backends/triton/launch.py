"""How the Triton kernels are launched: tilings, per-shape launch plans, and a launcher that skips
Triton's per-call dispatch once a kernel is compiled.

A layer sees the same shape and layout step after step, and in eager mode on a GPU every
microsecond of Python per launch counts: everything that depends only on the shape, strides, dtype
and device (grids, integer arguments, tile sizes, how far a group's reduction is split) is
computed once into a :class:`LaunchPlan`, and :func:`run_kernel` keeps the compiled kernels each
plan launched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from torch import Tensor

from .._dims import dims_of
from .kernels import available, interpreting, triton_version

__all__ = [
    "CONFIG",
    "DIRECT_LAUNCH",
    "DTYPES",
    "Config",
    "LaunchPlan",
    "Tiling",
    "direct_launch_supported",
    "geometry",
    "launch_plan",
    "run_kernel",
    "supported",
]

#: The input dtypes the kernels read.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs (tests shrink the tiles to exercise multi-tile and multi-program paths)."""

    # Elements per tile. A reduction program keeps three float32 accumulators per element: 2048
    # elements over 8 warps is 8 per thread, about 64 registers (sm_90), so 4 programs fit per SM.
    reduce_tile: int = 2048
    apply_tile: int = 4096
    reduce_warps: int = 8
    apply_warps: int = 4
    # The widest channel block: C-innermost tiles then still span several rows.
    max_block_channels: int = 128
    # Reductions aim for this many programs per SM, splitting groups to get there...
    programs_per_sm: int = 8
    # ...but give every program at least this many tiles, and never split a group further.
    min_tiles_per_program: int = 4
    max_split: int = 256
    # Elements per tile of the kernels that finish the statistics and the backward sums.
    finish_tile: int = 2048


#: The knobs :func:`launch_plan` uses (read on each call, so that tests can replace it).
CONFIG = Config()


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _sm_count(device_index: int) -> int:
    if device_index >= 0:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4  # the interpreter: any small number


def geometry(xg: Tensor) -> tuple[int, int] | None:
    """``(A, B)`` of the dense ``(G, A, C, B)`` block ``xg`` is, or None for other layouts."""
    return _geometry_of(tuple(xg.shape), xg.stride())


def _geometry_of(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int] | None:
    d = dims_of(shape, stride) if 3 <= len(shape) <= 6 else None
    return None if d is None else (d[1], d[3])


def supported(xg: Tensor) -> bool:
    """Whether the kernels handle the grouped view ``xg`` (dtype, layout, device)."""
    if not xg.is_cuda and not (xg.is_cpu and interpreting()):
        return False
    if not available() or xg.dtype not in DTYPES or not 3 <= xg.dim() <= 6 or xg.numel() == 0:
        return False
    return geometry(xg) is not None


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a ``(G, A, C, B)`` block is cut into ``[BA, BCH, BB]`` tiles, with the kernels'
    integer arguments ``(A, C, B, n_cb, n_bt, n_tiles)``."""

    G: int
    A: int
    C: int
    B: int
    BA: int
    BCH: int
    BB: int

    @property
    def n_cb(self) -> int:
        return _cdiv(self.C, self.BCH)

    @property
    def n_bt(self) -> int:
        return _cdiv(self.B, self.BB)

    @property
    def n_tiles(self) -> int:
        """Tiles per (group, channel block)."""
        return _cdiv(self.A, self.BA) * self.n_bt

    def args(self) -> tuple[int, ...]:
        return (self.A, self.C, self.B, self.n_cb, self.n_bt, self.n_tiles)

    def blocks(self) -> tuple[tuple[str, int], ...]:
        """The tile sizes as the kernels' last constexpr arguments, in their order."""
        return (("BA", self.BA), ("BCH", self.BCH), ("BB", self.BB))


def _tiling(A: int, B: int, G: int, C: int, tile: int, config: Config) -> Tiling:
    if B == 1:
        BB = 1
    elif B <= 512:
        BB = _pow2(B)
    else:
        # Long planes: the run length that pads the plane least (ties go to the longer run).
        BB = min((128, 256, 512), key=lambda bb: (_cdiv(B, bb) * bb, -bb))
    BB = min(BB, tile)
    BCH = min(_pow2(C), max(1, tile // BB), config.max_block_channels)
    BA = min(_pow2(A), max(1, tile // (BB * BCH)))
    return Tiling(G, A, C, B, BA, BCH, BB)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """Everything the host functions pass to the kernels for one shape and layout: computed
    once per (shape, strides, dtype, device) by :func:`launch_plan`."""

    G: int
    C: int
    # Reductions (statistics, backward sums): a grid of (G, split, channel blocks) programs.
    reduce_grid: tuple[int]
    reduce_args: tuple[int, ...]  # tiling.args() + (tiles_per_split, split)
    reduce_blocks: tuple[tuple[str, int], ...]
    reduce_warps: int
    split: int
    # Elementwise passes (normalize, backward_apply): one tile per program.
    apply_grid: tuple[int]
    apply_args: tuple[int, ...]
    apply_blocks: tuple[tuple[str, int], ...]
    apply_warps: int
    # The finishing kernels: one program per channel block.
    finish_grid: tuple[int]
    finish_blocks: tuple[tuple[str, int], ...]
    device_index: int
    # Compiled kernels for this shape, launched without Triton's dispatch (see run_kernel).
    runners: dict[tuple[Any, ...], Any] = dataclasses.field(
        default_factory=dict, compare=False, hash=False
    )


def launch_plan(xg: Tensor) -> LaunchPlan:
    """The plan for ``xg``; ``ValueError`` for a view the kernels do not handle."""
    return _plan_for(xg.shape, xg.stride(), xg.dtype, xg.get_device(), CONFIG)


@functools.lru_cache(maxsize=1024)
def _plan_for(
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    dtype: torch.dtype,
    device_index: int,  # -1: the CPU
    config: Config,
) -> LaunchPlan:
    # supported()'s checks, once per key (a failed check raises, and is not cached).
    geometry = _geometry_of(shape, stride) if 3 <= len(shape) <= 6 else None
    if (
        not available()
        or (device_index < 0 and not interpreting())
        or dtype not in DTYPES
        or math.prod(shape) == 0
        or geometry is None
    ):
        raise ValueError(
            f"fxghost triton backend: unsupported grouped view: shape {tuple(shape)}, "
            f"strides {stride}, dtype {dtype}, {'CPU' if device_index < 0 else 'CUDA'} device"
        )
    A, B = geometry
    G, C = shape[0], shape[2]
    red = _tiling(A, B, G, C, config.reduce_tile, config)
    # How many programs share a (group, channel block): enough to fill the GPU...
    wanted = config.programs_per_sm * _sm_count(device_index)
    split = min(
        _cdiv(wanted, G * red.n_cb),
        _cdiv(red.n_tiles, config.min_tiles_per_program),  # ...with a few tiles each
        config.max_split,
    )
    tiles_per_split = _cdiv(red.n_tiles, max(1, split))
    split = _cdiv(red.n_tiles, tiles_per_split)  # recounted: no program is left without tiles
    app = _tiling(A, B, G, C, config.apply_tile, config)
    # Finishing tiles [BG, BS, BCH] (groups, partials, channels) of at most finish_tile values.
    f_bch = min(_pow2(C), 64, config.finish_tile)
    f_bs = min(_pow2(split), 16, max(1, config.finish_tile // f_bch))
    f_bg = min(_pow2(G), max(1, config.finish_tile // (f_bs * f_bch)))
    return LaunchPlan(
        G=G,
        C=C,
        reduce_grid=(G * red.n_cb * split,),
        reduce_args=(*red.args(), tiles_per_split, split),
        reduce_blocks=red.blocks(),
        reduce_warps=config.reduce_warps,
        split=split,
        apply_grid=(G * app.n_cb * app.n_tiles,),
        apply_args=app.args(),
        apply_blocks=app.blocks(),
        apply_warps=config.apply_warps,
        finish_grid=(_cdiv(C, f_bch),),
        finish_blocks=(("BG", f_bg), ("BS", f_bs), ("BCH", f_bch)),
        device_index=device_index,
    )


def direct_launch_supported() -> bool:
    """Whether :func:`run_kernel` may launch compiled kernels itself: on CUDA (not the
    interpreter), with a Triton whose compiled kernels take every parameter, constexprs
    included, in signature order (checked in 3.6 and 3.8)."""
    version = triton_version()
    return version is not None and not interpreting() and version >= (3, 5)


#: Whether :func:`run_kernel` launches compiled kernels itself (tests and probes switch it).
DIRECT_LAUNCH = direct_launch_supported()


def run_kernel(
    plan: LaunchPlan,
    kernel: Any,
    grid: tuple[int, ...],
    stream: int,
    args: tuple[Any, ...],
    consts: tuple[tuple[str, Any], ...],
    num_warps: int,
) -> None:
    """``kernel[grid](*args, **dict(consts), num_warps=num_warps)``, on ``stream``.

    Triton's dispatch binds and specializes every argument and hashes a cache key on each call:
    tens of microseconds of CPU per launch, six launches per layer step, which small layers in
    eager mode do not hide behind their kernels. The first call here goes through that dispatch
    and keeps the compiled kernel it returns; later calls with the same specialization launch it
    directly. What Triton specializes on is fixed by ``plan`` (shape, strides, dtype: the integer
    arguments, by value) and by ``consts``, except for the tensors' dtypes and their pointers'
    16-byte alignment, which make the rest of the key; an unaligned tensor takes Triton's
    dispatch. The tensors come first in ``args`` (the kernels' ``*_ptr`` parameters, which the
    key loop reads), and ``consts`` follow ``args`` in the kernel's signature, in its order: a
    tensor after the pointers, or constexprs out of order, are found at the compile, and such a
    call always takes the dispatch.
    """
    if DIRECT_LAUNCH:
        pointers = _pointer_count(kernel)
        key: list[Any] = [kernel, grid, consts, num_warps]
        for t in args[:pointers]:
            if t.data_ptr() % 16:
                break
            key.append(t.dtype)
        else:
            k = tuple(key)
            entry = plan.runners.get(k)
            if entry is not None:
                entry[0](*args, *entry[1], stream=stream)
                return
            compiled = kernel[grid](*args, **dict(consts), num_warps=num_warps)
            if (
                tuple(kernel.arg_names[len(args) :]) == tuple(n for n, _ in consts)
                and not any(isinstance(a, Tensor) for a in args[pointers:])
                and hasattr(compiled, "__getitem__")
            ):
                # A compiled kernel's launcher reads all three grid dimensions.
                runner = compiled[(*grid, 1, 1)[:3]]
                plan.runners[k] = (runner, tuple(v for _, v in consts))
            return
    kernel[grid](*args, **dict(consts), num_warps=num_warps)


@functools.cache
def _pointer_count(kernel: Any) -> int:
    """How many of ``kernel``'s parameters, from the first, are pointers (named ``*_ptr``, as
    all of :mod:`.kernels`' are, ahead of the scalars)."""
    n = 0
    for name in kernel.arg_names:
        if not name.endswith("_ptr"):
            break
        n += 1
    return n
