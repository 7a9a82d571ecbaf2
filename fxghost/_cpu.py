"""Fused CPU kernels for ghost normalization, compiled from ``_cpu_kernels.c`` on first use.

PyTorch has no CPU kernel for per-(group, channel) statistics, and composing one from torch ops
streams the tensor through memory a dozen times per step (a 2-core machine is memory-bound long
before it is compute-bound). The kernels here read x from memory once and write y once in the
forward, read x and dy once and write dx once in the backward (large outputs with non-temporal
stores), and keep each block hot in cache between passes. The backward returns the weight and
bias gradients themselves, and :func:`running_update` applies the running-statistics update:
in eager mode the small torch ops they replace cost more than the kernels on tabular layers.

The C source is plain C99 without torch headers, so it compiles in about a second with the
system's C compiler (the one ``torch.compile`` uses on CPU); the shared object is cached under
``$FXGHOST_CACHE_DIR`` (default ``~/.cache/fxghost``), keyed by the source, compiler and CPU.
Without a compiler, or with ``FXGHOST_CPU_KERNELS=0``, fxghost falls back to torch ops.
Work is split between ``torch.get_num_threads()`` threads of torch's own OpenMP runtime (see the
C source); ctypes releases the GIL for the calls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "backward", "build", "enabled", "forward", "library_path", "running_update"]

_SOURCE = Path(__file__).with_name("_cpu_kernels.c")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_log = logging.getLogger("fxghost")
# Below this many elements a second thread costs more than it saves.
_PARALLEL_MIN_NUMEL = 1 << 16


def _cache_dir() -> Path:
    explicit = os.environ.get("FXGHOST_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxghost"


def _cpu_signature() -> str:
    # -march=native code must not be reused on another CPU (a shared home directory on a cluster).
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compile(cmd: list[str], out: Path) -> str | None:
    """Run ``cmd`` (a compile command ending in ``-o``) into ``out``; ``None`` on success, else
    the compiler's message."""
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        done = subprocess.run(
            [*cmd, str(tmp)], capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if done.returncode == 0:
        os.replace(tmp, out)  # atomic: concurrent processes may build the same object
        return None
    tmp.unlink(missing_ok=True)
    return done.stderr or done.stdout


def build(
    stem: str,
    sources: Sequence[Path],
    compiler: tuple[str, tuple[str, ...]],
    flag_sets: Sequence[Sequence[str]],
    link: Sequence[str] = (),
    key: Sequence[str] = (),
) -> Path | None:
    """A shared object compiled from ``sources[0]`` (which includes the others), cached under
    :func:`_cache_dir`; ``None`` when it cannot be built.

    ``compiler`` is ``(environment variable, names to look for)``; each of ``flag_sets`` is tried
    in turn. The cache key covers the sources, the compiler, the flags, the machine and ``key``.
    A failed build leaves a ``.failed`` file with the compiler's messages, so that later processes
    do not try again (delete it to retry).
    """
    env, names = compiler
    cc = os.environ.get(env) or next((c for c in names if shutil.which(c)), None)
    if cc is None:
        return None
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    texts = [cc, version, platform.machine(), _cpu_signature(), *link, *key]
    texts += [" ".join(flags) for flags in flag_sets]
    parts = [p.read_bytes() for p in sources] + [t.encode() for t in texts]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "fxghost"):
        path = directory / f"{stem}_{digest}.so"
        failed = path.with_suffix(".failed")
        if path.exists():
            return path
        if failed.exists():
            return None
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        _log.info("fxghost: compiling %s into %s", sources[0].name, path)
        message = ""
        for flags in flag_sets:
            error = _compile([cc, *flags, "-fPIC", "-shared", str(sources[0]), *link, "-o"], path)
            if error is None:
                return path
            message += f"$ {cc} {' '.join(flags)}\n{error}\n"
        try:
            failed.write_text(message)
        except OSError:
            pass
        return None
    return None


@functools.cache
def library_path() -> Path | None:
    """The compiled kernels' shared object, built if needed; ``None`` when unavailable."""
    if not enabled() or not _SOURCE.exists():
        return None
    # -fno-math-errno lets sqrt vectorize; it changes no result (only errno is left unset).
    std = ["-O3", "-std=c99", "-fno-math-errno"]
    flag_sets = [[*std, "-march=native", "-fopenmp"], [*std, "-fopenmp"], std]
    return build("cpu_kernels", [_SOURCE], ("CC", ("cc", "gcc", "clang")), flag_sets, ["-lm"])


def enabled() -> bool:
    """Whether compiled CPU code may be used at all (``FXGHOST_CPU_KERNELS`` is not ``0``)."""
    return os.environ.get("FXGHOST_CPU_KERNELS", "1") != "0"


class _Kernels:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        ptr, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        self.forward = {}
        self.backward = {}
        self.running = {}
        for dtype, sfx in _SUFFIX.items():
            fwd = getattr(lib, f"fxg_forward_{sfx}")
            fwd.argtypes = [ptr] * 7 + [i64] * 4 + [f64, i64]
            fwd.restype = ctypes.c_int
            bwd = getattr(lib, f"fxg_backward_{sfx}")
            bwd.argtypes = [ptr] * 8 + [i64] * 5
            bwd.restype = ctypes.c_int
            run = getattr(lib, f"fxg_running_{sfx}")
            run.argtypes = [ptr] * 3 + [i64] * 2 + [f64] * 2 + [ptr] * 2
            run.restype = ctypes.c_int
            self.forward[dtype], self.backward[dtype], self.running[dtype] = fwd, bwd, run


@functools.cache
def _kernels() -> _Kernels | None:
    path = library_path()
    if path is None:
        return None
    try:
        return _Kernels(path)
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """Whether the compiled kernels can be used in this process (compiling them if needed)."""
    return _kernels() is not None


def _threads(numel: int) -> int:
    # Below this size a parallel region costs more than it saves.
    return torch.get_num_threads() if numel >= _PARALLEL_MIN_NUMEL else 1


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


Dims = tuple[int, int, int, int]


def _run(
    fn: Any, tensors: tuple[Tensor | None, ...], dims: Dims, extra: tuple[float, ...], numel: int
) -> None:
    _check(fn(*(_ptr(t) for t in tensors), *dims, *extra, _threads(numel)))


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("fxghost: the CPU kernels could not allocate their scratch memory")


def forward(
    x: Tensor, y: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dims: Dims
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x`` into ``y`` (both dense, elements laid out as the contiguous
    ``dims = (G, A, C, S)``); returns ``(mean, biased var, rstd)``, each ``(G, C)`` in ``x``'s
    dtype. ``weight`` and ``bias`` are contiguous in ``x``'s dtype, or ``None``."""
    kernels = _loaded()
    # Separate small tensors: cheaper per call than unbinding one (a few µs each call).
    mean, var, rstd = (torch.empty(dims[0], dims[2], dtype=x.dtype) for _ in range(3))
    tensors = (x, y, weight, bias, mean, var, rstd)
    _run(kernels.forward[x.dtype], tensors, dims, (float(eps),), x.numel())
    return mean, var, rstd


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dx: Tensor | None,
    dims: Dims,
) -> tuple[Tensor, Tensor]:
    """The weight and bias gradients before any dtype cast, ``sum(dy * xhat)`` and ``sum(dy)``
    over all groups (each ``(C,)`` in ``x``'s dtype), and the input gradient written into ``dx``
    unless it is ``None``; ``dy``, ``x`` and ``dx`` laid out alike, as in :func:`forward`."""
    kernels = _loaded()
    grad_w, grad_b = (torch.empty(dims[2], dtype=x.dtype) for _ in range(2))
    tensors = (dy, x, weight, mean, rstd, dx, grad_w, grad_b)
    _run(kernels.backward[x.dtype], tensors, dims, (), x.numel())
    return grad_w, grad_b


def running_update(
    mean: Tensor,
    var: Tensor,
    weights: Tensor,
    start: int,
    beta: float,
    unbias: float,
    running_mean: Tensor,
    running_var: Tensor,
) -> None:
    """``running = beta * running + sum_g weights[start + g] * stat[g]`` in place, for the mean
    and for the variance scaled by ``unbias``, with ``mean`` and ``var`` holding contiguous
    ``(G, C)`` values and every tensor in one dtype (see :func:`applies_to_running`). One call
    instead of the dozen small torch ops of :func:`fxghost._math.update_running_stats`."""
    channels = running_mean.numel()
    failed = _loaded().running[mean.dtype](
        mean.data_ptr(),
        var.data_ptr(),
        weights.data_ptr() + start * weights.element_size(),
        mean.numel() // channels,
        channels,
        beta,
        unbias,
        running_mean.data_ptr(),
        running_var.data_ptr(),
    )
    _check(failed)


def applies_to_running(*tensors: Tensor) -> bool:
    """Whether :func:`running_update` can take these tensors: CPU, dense, one float dtype."""
    dtype = tensors[0].dtype
    return (
        dtype in _SUFFIX
        and all(t.is_cpu and t.dtype == dtype and t.is_contiguous() for t in tensors)
        and available()
    )


def _loaded() -> _Kernels:
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("fxghost: the CPU kernels are not available")
    return kernels
