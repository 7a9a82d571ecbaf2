"""The CPU backend: fused C kernels for ghost normalization, compiled on first use.

PyTorch has no CPU kernel for per-(group, channel) statistics, and composing one from torch ops
streams the tensor through memory a dozen times per step (a 2-core machine is memory-bound long
before it is compute-bound). The kernels (``cpu_kernels.c``) read x from memory once and write y
once in the forward, read x and dy once and write dx once in the backward (large outputs with
non-temporal stores), and keep each block hot in cache between passes. The backward returns the
weight and bias gradients themselves, and :func:`_accumulate` applies the running-statistics
update: in eager mode the small torch ops they replace cost more than the kernels on tabular
layers. Work is split between ``torch.get_num_threads()`` threads of torch's own OpenMP runtime;
ctypes releases the GIL for the calls.

In eager mode the kernels run from a C++ autograd op (``cpu_autograd.cpp``, the same kernels
with the same arguments, so bit for bit the same results): the Python around them (an
``autograd.Function``'s forward and backward, the ctypes calls, a dozen small tensor calls)
doubled a layer call's cost over plain BatchNorm's. Where the C++ op cannot be built (no C++20
compiler, a torch without headers), the ``autograd.Function`` over ctypes runs instead. Under
``torch.compile`` the kernels are custom ops (:func:`fxghost.backends._fused.register_norm_ops`).

Both are compiled with the system's compilers (C in about a second, C++ in about half a minute),
once per source, compiler and CPU, and cached under ``$FXGHOST_CACHE_DIR`` (default
``~/.cache/fxghost``), private to the user and verified before loading (:mod:`._build`). A build
says so on stderr when it starts and ends; ``python -m fxghost build`` builds ahead of time.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import _math
from . import torch_ops
from ._build import build, say, verified
from ._common import (
    Backend,
    Epilogue,
    NormParams,
    RunningStatsUpdate,
    apply_epilogue,
    define_op,
    param_dtypes,
    param_grads,
    per_channel,
    standard,
)
from ._dims import Dims, dims_of
from ._fused import (
    FusedGhostNorm,
    Kernels,
    Saved,
    kernel_norm_backward_fake,
    kernel_norm_fake,
    register_norm_ops,
    relu_differentiable_backward,
)

__all__ = [
    "COMPILED",
    "EAGER",
    "CpuKernelGhostNorm",
    "available",
    "build_all",
    "c_kernels",
    "cpp_ops",
    "custom_op_norm",
    "custom_op_norm_relu",
    "library_path",
    "op_available",
    "op_library_path",
]

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
# The C++ op's source first; it includes the kernels' source.
_OP_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_autograd.cpp", "cpu_kernels.c")]
_SUFFIX = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
}
# Below this many elements a second thread costs more than it saves.
_PARALLEL_MIN_NUMEL = 1 << 16


@functools.cache
def library_path() -> Path | None:
    """The compiled kernels' shared object, built if needed; ``None`` when unavailable."""
    if not _SOURCE.exists():
        return None
    # -fno-math-errno lets sqrt vectorize, -fno-trapping-math the selects of the 16-bit
    # conversions and the ReLU; neither changes a result (errno and the floating-point exception
    # flags are left as they fall).
    std = ["-O3", "-std=c99", "-fno-math-errno", "-fno-trapping-math"]
    flag_sets = [[*std, "-march=native", "-fopenmp"], [*std, "-fopenmp"], std]
    return build(
        "cpu_kernels",
        [_SOURCE],
        ("CC", ("cc", "gcc", "clang")),
        flag_sets,
        ["-lm"],
        what="the CPU kernels",
        fallback="torch ops (slower); install a C compiler (cc) for them",
    )


class _Kernels:
    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        ptr, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
        self.forward = {}
        self.backward = {}
        self.running = {}
        for dtype, sfx in _SUFFIX.items():
            fwd = getattr(lib, f"fxg_forward_{sfx}")
            fwd.argtypes = [ptr] * 8 + [i64] * 4 + [f64, i64, i64]
            fwd.restype = ctypes.c_int
            bwd = getattr(lib, f"fxg_backward_{sfx}")
            bwd.argtypes = [ptr] * 10 + [i64] * 5
            bwd.restype = ctypes.c_int
            run = getattr(lib, f"fxg_running_{sfx}")
            run.argtypes = [ptr] * 3 + [i64] * 2 + [f64] * 2 + [ptr] * 2
            run.restype = ctypes.c_int
            self.forward[dtype], self.backward[dtype], self.running[dtype] = fwd, bwd, run


@functools.cache
def c_kernels() -> _Kernels | None:
    path = library_path()
    if path is None or not verified(path):
        return None
    try:
        return _Kernels(path)
    except (OSError, AttributeError):
        return None


def _threads(numel: int) -> int:
    # Below this size a parallel region costs more than it saves.
    return torch.get_num_threads() if numel >= _PARALLEL_MIN_NUMEL else 1


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run(
    fn: Any,
    tensors: tuple[Tensor | None, ...],
    dims: Dims,
    extra: tuple[float | int, ...],
    numel: int,
) -> None:
    _check(fn(*(_ptr(t) for t in tensors), *dims, *extra, _threads(numel)))


def _laid_out_as(t: Tensor, like: Tensor) -> Tensor:
    """``t``, or a copy of it with ``like``'s strides (what the kernels read as one layout)."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("fxghost: the CPU kernels could not allocate their scratch memory")


def _kernel_forward(
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    dims: Dims,
    residual: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalize ``x`` into ``y`` (both dense, elements laid out as the contiguous
    ``dims = (G, A, C, S)``), with the epilogue ``relu(... + residual)`` where ``relu`` (the
    residual, laid out as ``x``, optional); returns ``(mean, biased var, rstd)``, each ``(G, C)``
    in the statistics dtype (float32 for 16-bit inputs). ``weight`` and ``bias`` are contiguous
    in that dtype, or ``None``."""
    kernels = _loaded()
    # Separate small tensors: cheaper per call than unbinding one (a few µs each call).
    dtype = _math.stat_dtype(x.dtype)
    mean, var, rstd = (torch.empty(dims[0], dims[2], dtype=dtype) for _ in range(3))
    tensors = (x, residual, y, weight, bias, mean, var, rstd)
    _run(kernels.forward[x.dtype], tensors, dims, (float(eps), int(relu)), x.numel())
    return mean, var, rstd


def _kernel_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dx: Tensor | None,
    dims: Dims,
    mask: Tensor | None = None,
    dres: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The weight and bias gradients before any dtype cast, ``sum(dy * xhat)`` and ``sum(dy)``
    over all groups (each ``(C,)`` in the statistics dtype), and the input gradient written into
    ``dx`` unless it is ``None``; ``dy``, ``x`` and ``dx`` laid out alike, as in :func:`forward`.
    With a ReLU epilogue, ``mask`` is the forward's output, which masks ``dy`` as ReLU's backward
    does, and the masked ``dy`` (the residual's gradient) is written into ``dres`` unless it is
    ``None``."""
    kernels = _loaded()
    grad_w, grad_b = (torch.empty(dims[2], dtype=mean.dtype) for _ in range(2))
    tensors = (dy, mask, x, weight, mean, rstd, dx, dres, grad_w, grad_b)
    _run(kernels.backward[x.dtype], tensors, dims, (), x.numel())
    return grad_w, grad_b


def _loaded() -> _Kernels:
    kernels = c_kernels()
    if kernels is None:
        raise RuntimeError("fxghost: the CPU kernels are not available")
    return kernels


@functools.cache
def op_library_path() -> Path | None:
    """The C++ op's shared object, built if needed; ``None`` when unavailable."""
    if library_path() is None:
        return None
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    if not (include / "torch" / "library.h").exists() or not all(p.exists() for p in _OP_SOURCES):
        return None
    common = [
        "-O3",
        # C++ contracts a * b + c into FMAs by default, ISO C does not: the kernels must round
        # as in the C build for the results to be the same bit for bit.
        "-ffp-contract=off",
        "-fno-math-errno",  # as in the C build
        "-fno-trapping-math",
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
    return build(
        "cpu_autograd",
        _OP_SOURCES,
        ("CXX", ("c++", "g++", "clang++")),
        flag_sets,
        link,
        key=[torch.__version__, str(torch_dir)],
        what="the CPU kernels' C++ autograd op",
        fallback="the same kernels through ctypes (a few microseconds more per layer call)",
    )


@functools.cache
def cpp_ops() -> Any:
    """``torch.ops.fxghost`` with the C++ op library loaded (built if needed), or ``None``."""
    path = op_library_path()
    if path is None or not verified(path):
        return None
    try:
        torch.ops.load_library(str(path))
        ops = torch.ops.fxghost
        # Looked up here, so that a library without both ops falls back as a failed load does.
        ops.eager_cpu_ghost_norm.default, ops.eager_cpu_ghost_norm_update.default  # noqa: B018
        return ops
    except (OSError, RuntimeError, AttributeError) as e:
        say(f"could not load the CPU kernels' C++ op ({e}); using them through ctypes")
        return None


def available() -> bool:
    """Whether the C kernels can be used in this process (compiling them if needed)."""
    return c_kernels() is not None


def op_available() -> bool:
    """Whether the C++ autograd op can be used (compiling it if needed)."""
    return cpp_ops() is not None


def build_all() -> dict[str, Path | None]:
    """Build (or find in the cache) everything this backend compiles; the shared objects'
    paths, ``None`` for what could not be built."""
    return {"CPU kernels": library_path(), "C++ autograd op": op_library_path()}


def _cpu_forward(
    xg: Tensor, params: NormParams, dims: Dims
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` from the C kernels: ``y`` sample-first, the statistics
    ``(G, C)``."""
    weight, bias, eps = params
    out = torch.empty_like(xg.flatten(0, 1))  # a dense input's strides: laid out as xg
    mean, var, rstd = _kernel_forward(
        xg, out, _as_param(weight, xg), _as_param(bias, xg), eps, dims
    )
    return out, mean, var, rstd


def _function_forward(
    xg: Tensor, params: NormParams
) -> tuple[Tensor, Tensor, Tensor, Tensor, Dims]:
    """:data:`~._fused.ForwardKernels` of the C kernels; ``extra``: the input's dims."""
    dims = _dense_dims(xg)
    return (*_cpu_forward(xg, params, dims), dims)


def _cpu_backward(
    dy: Tensor, saved: Saved, input_grad: bool, dims: Dims
) -> tuple[Tensor | None, Tensor, Tensor]:
    xg, weight, mean, rstd = saved
    dy = _laid_out_as(dy, xg)  # the incoming gradient may have any layout: bring it to x's
    grad_x = torch.empty_like(xg) if input_grad else None
    dweight, dbias = _kernel_backward(dy, xg, _as_param(weight, xg), mean, rstd, grad_x, dims)
    return grad_x, dweight, dbias


class CpuKernelGhostNorm(FusedGhostNorm):
    """Ghost normalization in the fused C kernels through ctypes (CPU, float32/float64, dense
    inputs): forward reads x twice and writes y once; backward reads x and dy twice and writes
    dx once, in cache-sized blocks so that each second read comes from cache."""

    kernels = Kernels(_function_forward, _cpu_backward)


def _as_param(p: Tensor | None, like: Tensor) -> Tensor | None:
    """A weight or bias as a contiguous vector in the statistics dtype of ``like`` (float32 for
    16-bit inputs), as the C kernels read it."""
    dtype = _math.stat_dtype(like.dtype)
    if p is None or (p.dtype == dtype and p.is_contiguous()):
        return p  # only its data is read
    return p.detach().to(dtype).contiguous()


def _dense_dims(xg: Tensor) -> Dims:
    d = dims_of(tuple(xg.shape), xg.stride())
    if d is None:  # the backend makes inputs dense before they get here
        raise ValueError(f"fxghost: the CPU kernels need a dense input, got strides {xg.stride()}")
    return d


def _on_dense(
    xg: Tensor,
    like: Callable[[Tensor], Tensor],
    run: Callable[[Tensor, Dims], tuple[Any, ...]],
) -> tuple[Any, ...]:
    """``run(xg, dims)`` when the kernels can read ``xg`` as it is. Otherwise (compiled code may
    pass a layout its trace did not see) ``run`` on a contiguous copy, with the full-size first
    result copied into ``like(xg)``: the layout the custom op's fake implementation promised."""
    d = dims_of(tuple(xg.shape), xg.stride())
    if d is not None:
        return run(xg, d)
    contiguous = xg.contiguous()
    first, *rest = run(contiguous, _dense_dims(contiguous))
    return (like(xg).copy_(first), *rest)


def _op_forward(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` as :func:`_cpu_forward` returns them."""
    return _on_dense(  # type: ignore[return-value]
        xg,
        lambda t: torch.empty_like(t.flatten(0, 1)),
        lambda t, d: _cpu_forward(t, NormParams(weight, bias, eps), d),
    )


def _op_backward(
    dy: Tensor, xg: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _on_dense(  # type: ignore[return-value]
        xg, torch.empty_like, lambda t, d: _cpu_backward(dy, Saved(t, weight, mean, rstd), True, d)
    )


custom_op_norm = register_norm_ops("cpu_ghost_norm", ("cpu",), _op_forward, _op_backward)


def _epilogue_forward(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, rstd)`` with ``y = relu(bn(xg) + residual)`` (``relu(bn(xg))`` without
    a residual), ``y`` laid out as ``xg`` as the fake promises."""

    def run(x: Tensor, d: Dims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        res = None if residual is None else _laid_out_as(residual, x)
        y = torch.empty_like(x.flatten(0, 1))
        params = (_as_param(weight, x), _as_param(bias, x))
        return y, *_kernel_forward(x, y, *params, eps, d, res, relu=True)

    return _on_dense(  # type: ignore[return-value]
        xg, lambda t: torch.empty_like(t.flatten(0, 1)), run
    )


def _epilogue_backward(
    dy: Tensor,
    y: Tensor,
    xg: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    residual_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, dweight, dbias, grad_residual)`` of :func:`_epilogue_forward`, ``dy`` and
    ``y`` grouped like ``xg``: the incoming gradient masked where ``y <= 0``, as ReLU's backward
    masks it; ``grad_residual`` is that masked gradient (empty unless ``residual_grad``)."""
    x = xg if dims_of(tuple(xg.shape), xg.stride()) is not None else xg.contiguous()
    d = _dense_dims(x)
    g, m = _laid_out_as(dy, x), _laid_out_as(y, x)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if residual_grad else x.new_empty(0)
    grad_w, grad_b = _kernel_backward(
        g, x, _as_param(weight, x), mean, rstd, dx, d, m, dres if residual_grad else None
    )
    if x is not xg:
        dx = torch.empty_like(xg).copy_(dx)
        dres = torch.empty_like(xg).copy_(dres) if residual_grad else dres
    return dx, grad_w, grad_b, dres


def _epilogue_forward_fake(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor | None
) -> tuple[Tensor, ...]:
    return kernel_norm_fake(xg, weight, bias, eps)


def _epilogue_backward_fake(
    dy: Tensor,
    y: Tensor,
    xg: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    residual_grad: bool,
) -> tuple[Tensor, ...]:
    dres = torch.empty_like(xg) if residual_grad else xg.new_empty(0)
    return (*kernel_norm_backward_fake(dy, xg, weight, mean, rstd), dres)


_epilogue_op = define_op(
    "cpu_ghost_norm_relu",
    _epilogue_forward,
    _epilogue_forward_fake,
    "(Tensor xg, Tensor? weight, Tensor? bias, float eps, Tensor? residual)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
    device_types=("cpu",),
)
_epilogue_backward_op = define_op(
    "cpu_ghost_norm_relu_backward",
    _epilogue_backward,
    _epilogue_backward_fake,
    "(Tensor dy, Tensor y, Tensor xg, Tensor? weight, Tensor mean, Tensor rstd,"
    " bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)",
    device_types=("cpu",),
)


def _epilogue_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    xg, weight, bias, ctx.eps, residual = inputs
    ctx.param_dtypes = param_dtypes(weight, bias)
    ctx.has_residual = residual is not None
    ctx.save_for_backward(xg, weight, output[1], output[3], output[0])


def _epilogue_autograd(ctx: Any, dy: Tensor, *_unused: Tensor | None) -> tuple[Tensor | None, ...]:
    xg, weight, mean, rstd, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    residual_grad = ctx.has_residual and needs[4]
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops (see FusedGhostNorm)
        grad_x, dweight, dbias, dres = relu_differentiable_backward(
            dy, y, xg, weight, ctx.eps, needs, residual_grad
        )
    else:
        grouped = xg.shape
        grad_x, dweight, dbias, dres = _epilogue_backward_op(
            dy.view(grouped), y.view(grouped), xg, weight, mean, rstd, residual_grad
        )
        dres = dres if residual_grad else None
    return grad_x, *param_grads(ctx, dweight, dbias), None, dres


_epilogue_op.register_autograd(_epilogue_autograd, setup_context=_epilogue_setup)


def custom_op_norm_relu(
    xg: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)`` with the ReLU epilogue (after adding ``residual``, grouped like
    ``xg``), in the kernels as custom ops for torch.compile; the statistics as
    :func:`custom_op_norm` gives them."""
    y, mean, var, _ = _epilogue_op(xg, weight, bias, eps, residual)
    return y, standard(mean, xg.shape), standard(var, xg.shape)


def _accumulate(
    mean: Tensor,
    var: Tensor,
    weights: Tensor,
    start: int,
    beta: float,
    unbias: float,
    running_mean: Tensor,
    running_var: Tensor,
) -> bool:
    """:data:`fxghost._math.Accumulate` in one C call, where every tensor is a dense CPU tensor
    of one float dtype (``mean`` and ``var`` hold contiguous ``(G, C)`` values)."""
    dtype = mean.dtype
    tensors = (mean, var, weights, running_mean, running_var)
    kernels = c_kernels()
    if (
        kernels is None
        or dtype not in _SUFFIX
        or not all(t.is_cpu and t.dtype == dtype and t.is_contiguous() for t in tensors)
    ):
        return False
    channels = running_mean.numel()
    _check(
        kernels.running[dtype](
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
    )
    return True


class _Eager(Backend):
    """Eager calls: the C++ autograd op, with the running-statistics update in its call where
    the buffers allow; :class:`CpuKernelGhostNorm` where the op could not be built."""

    name = "cpu"
    accumulate = staticmethod(_accumulate)
    fuses_epilogues = True

    @property
    def label(self) -> str:  # type: ignore[override]
        return "cpu (C++ op)" if cpp_ops() is not None else "cpu (ctypes)"

    def norm(
        self,
        xg: Tensor,
        params: NormParams,
        update: RunningStatsUpdate | None = None,
        epilogue: Epilogue | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        d = dims_of(tuple(xg.shape), xg.stride())
        if d is None:  # not laid out as the kernels read: a contiguous copy
            xg = xg.contiguous()
            d = _dense_dims(xg)
        ops = cpp_ops()
        kernel_update = None if update is None else _fused_coefficients(xg, update)
        if ops is None or (update is not None and kernel_update is None):
            # The ctypes Function (no C++ op), or buffers the C++ op does not take: the update
            # from Python, the epilogue after the normalization in torch ops.
            y, mean, var = CpuKernelGhostNorm.run(xg, params, self.update_hook(update, xg))
            return apply_epilogue(y, epilogue), mean, var
        if epilogue is not None and not _fusable(xg, epilogue):
            y, mean, var = self.norm(xg, params, update)
            return apply_epilogue(y, epilogue), mean, var
        residual = None if epilogue is None else epilogue.residual
        relu = epilogue is not None
        if update is None or kernel_update is None:  # no update (the other case returned above)
            return ops.eager_cpu_ghost_norm.default(xg, *params, d, residual, relu)  # type: ignore[no-any-return]
        # The update made in the C++ op's call: made from Python, it cost as much as the
        # normalization on a tabular layer. Every check here runs once per layer call.
        return ops.eager_cpu_ghost_norm_update.default(  # type: ignore[no-any-return]
            xg,
            *params,
            update.running_mean,
            update.running_var,
            update.num_batches_tracked,
            *kernel_update,
            _math.bessel(per_channel(xg)),
            d,
            residual,
            relu,
        )


def _fusable(xg: Tensor, epilogue: Epilogue) -> bool:
    """Whether the C++ op can run ``epilogue`` in its kernel: a residual laid out as ``xg``."""
    r = epilogue.residual
    return epilogue.relu and (
        r is None
        or (
            type(r) is Tensor
            and r.dtype == xg.dtype
            and r.shape == xg.shape
            and r.stride() == xg.stride()
        )
    )


def _fused_coefficients(xg: Tensor, update: RunningStatsUpdate) -> tuple[Tensor, float] | None:
    """``(weights, decay)`` of ``update`` for the C++ op's fused update (its ghost batches
    weighted, the running statistics decayed), or ``None`` where its buffers are not contiguous
    tensors in the statistics dtype (the input's, float32 for 16-bit inputs), as the kernel reads
    them."""
    running_mean, running_var = update.running_mean, update.running_var
    dtype = _math.stat_dtype(xg.dtype)
    if (
        running_mean.dtype != dtype
        or running_var.dtype != dtype
        or not (running_mean.is_contiguous() and running_var.is_contiguous())
    ):
        return None
    if update.momentum is not None:
        return _math.ema_coefficients(
            update.momentum, update.requested, xg.shape[0], dtype, xg.device
        )
    if update.num_batches_tracked is None:
        return None  # the Python update says why momentum=None cannot be kept without it
    return _math.cumulative_coefficients(
        int(update.num_batches_tracked), xg.shape[0], dtype, xg.device
    )


EAGER: Backend = _Eager()
COMPILED: Backend = torch_ops.CustomOpCompiled(
    "cpu", "cpu (custom op, compiled)", custom_op_norm, custom_op_norm_relu
)
