"""The eager CPU path as one C++ autograd op, compiled from ``_cpu_autograd.cpp`` on first use.

The C kernels of :mod:`fxghost._cpu` take about as long as PyTorch's own BatchNorm kernels, but
the Python around them (the ``autograd.Function``'s forward and backward, the ctypes calls, a
dozen small tensor calls) doubled the cost of a layer call over plain BatchNorm's. The op here
runs the same kernels with the same arguments, so its results are bit for bit the same, from
C++: one dispatcher call forward and a C++ autograd node backward.

It is built against the installed torch's headers with the system's C++ compiler, in about half
a minute, once per torch version, compiler and CPU; the shared object is cached next to the C
kernels' (``$FXGHOST_CACHE_DIR``). Where it cannot be built (no C++20 compiler, a torch without
headers), or with ``FXGHOST_CPU_AUTOGRAD=0``, the ``autograd.Function`` over ctypes is used.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import _cpu

__all__ = ["available", "library_path", "op"]

# The op's source first; it includes the kernels' source.
_SOURCES = [Path(__file__).with_name(name) for name in ("_cpu_autograd.cpp", "_cpu_kernels.c")]
_log = logging.getLogger("fxghost")


@functools.cache
def library_path() -> Path | None:
    """The op's shared object, built if needed; ``None`` when unavailable."""
    if not _cpu.enabled() or os.environ.get("FXGHOST_CPU_AUTOGRAD", "1") == "0":
        return None
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    if not (include / "torch" / "library.h").exists() or not all(p.exists() for p in _SOURCES):
        return None
    common = [
        "-O3",
        # C++ contracts a * b + c into FMAs by default, ISO C does not: the kernels must round
        # as in the C build for the results to be the same bit for bit.
        "-ffp-contract=off",
        "-fno-math-errno",  # as in the C build
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{include}",
        f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    # Recent torch headers need C++20; older ones build as C++17 with older compilers.
    flag_sets = [
        [*common, "-std=c++20", "-march=native", "-fopenmp"],
        [*common, "-std=c++17", "-fopenmp"],
    ]
    link = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch", "-ltorch_cpu"]
    return _cpu.build(
        "cpu_autograd",
        _SOURCES,
        ("CXX", ("c++", "g++", "clang++")),
        flag_sets,
        link,
        key=[torch.__version__, str(torch_dir)],
    )


@functools.cache
def _namespace() -> Any:
    """``torch.ops.fxghost`` with the op library loaded (built if needed), or ``None``."""
    path = library_path()
    if path is None:
        return None
    try:
        torch.ops.load_library(str(path))
        ops = torch.ops.fxghost
        # Looked up here, so that a library without both ops falls back as a failed load does.
        ops.eager_cpu_ghost_norm.default, ops.eager_cpu_ghost_norm_update.default  # noqa: B018
        return ops
    except (OSError, RuntimeError, AttributeError) as e:
        _log.warning("fxghost: could not load the CPU autograd op (%s); using the Python one", e)
        return None


@functools.cache
def op() -> Callable[..., Any] | None:
    """``fxghost::eager_cpu_ghost_norm(xg, weight, bias, eps) -> (y, mean, var)``, loaded (and
    built if needed); ``None`` when unavailable. It takes what
    :func:`fxghost._fast._cpu_kernel_norm` takes and returns what it returns."""
    ops = _namespace()
    return None if ops is None else ops.eager_cpu_ghost_norm.default


@functools.cache
def update_op() -> Callable[..., Any] | None:
    """``fxghost::eager_cpu_ghost_norm_update(xg, weight, bias, eps, running_mean, running_var,
    num_batches_tracked, ema_weights, beta, unbias) -> (y, mean, var)``: :func:`op`, then the
    running-statistics update of :func:`fxghost._math.update_running_stats` for ``xg``'s ghost
    batches alone, in place; ``None`` when unavailable."""
    ops = _namespace()
    return None if ops is None else ops.eager_cpu_ghost_norm_update.default


def available() -> bool:
    """Whether the op can be used in this process (building it if needed)."""
    return op() is not None
