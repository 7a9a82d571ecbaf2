"""Where a rewritten BatchNorm call runs: the backends, and the one choice between them.

Each family lives in its own module, with its kernels, host code, autograd Function and op
registration:

- :mod:`~fxghost.backends.torch_ops` (``"torch"``): plain torch ops, any device and dtype. Under
  ``torch.compile`` the decomposition with BatchNorm's analytic backward, which inductor fuses with
  neighbouring ops.
- :mod:`~fxghost.backends.cpu` (``"cpu"``): fused C kernels, compiled on first use (CPU, float32,
  float64, bfloat16 and float16; the 16-bit types read and written as such, computed in float32),
  with the ReLU and residual-add epilogues that the pass fuses into a BatchNorm.
- :mod:`~fxghost.backends.triton` (``"triton"``): fused Triton kernels (CUDA, float32, float16,
  bfloat16; on the CPU only under ``TRITON_INTERPRET=1``).

:func:`implementation_for` makes the whole decision, for every call, from the table below; the
rest of the code asks a backend to run, never which one it is.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from . import cpu, torch_ops, triton
from ._common import Backend, Epilogue, NormParams, RunningStatsUpdate
from ._dims import dims_of

__all__ = [
    "NAMES",
    "Backend",
    "Epilogue",
    "NormParams",
    "RunningStatsUpdate",
    "check",
    "implementation_for",
    "last_run",
    "record",
    "set_while_tracing",
]

#: What ``fxghost.transform(..., backend=...)`` takes.
NAMES = ("auto", "torch", "cpu", "triton")

_CPU_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})
_TRITON_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


class Case(NamedTuple):
    """What the choice depends on: how the call runs (``"eager"``, ``"compiled"`` under
    ``torch.compile``, ``"exporting"`` under ``torch.export``), the device type, the dtype,
    whether the grouped view is dense (laid out as the kernels read), whether it has spatial
    dims (conv layers) or not (tabular ``(N, C)``), and whether the call applies a fused
    epilogue (a ReLU, or a residual add and a ReLU, after the normalization)."""

    mode: str
    device: str
    dtype: torch.dtype
    dense: bool | None  # None: not asked (under torch.compile)
    spatial: bool
    fused: bool = False


# The "auto" choice: the first row that matches. ``None`` matches anything.
# mode         device  dtypes          dense  spatial  fused  backend
_TABLE: tuple[
    tuple[
        str | None,
        str | None,
        frozenset[torch.dtype] | None,
        bool | None,
        bool | None,
        bool | None,
        str,
    ],
    ...,
] = (
    # torch.export: plain aten ops only, so that exported programs load without fxghost.
    ("exporting", None, None, None, None, None, "torch"),
    # Under torch.compile on the CPU, measured (benchmarks/RESULTS.md): a tabular layer alone ran
    # about twice as fast in the C kernels as custom ops as in inductor's code for the
    # decomposition (a conv layer went either way), and whole networks whose layers end in a
    # fused ReLU ran faster with the decomposition, which inductor fuses with its neighbours (a
    # ResNet-18 step 4-7%, an MLP 4-9%).
    ("compiled", "cpu", _CPU_DTYPES, None, None, False, "cpu"),
    ("compiled", None, None, None, None, None, "torch"),
    ("eager", "cuda", _TRITON_DTYPES, True, None, None, "triton"),
    ("eager", "cpu", _CPU_DTYPES, True, None, None, "cpu"),
    ("eager", None, None, None, None, None, "torch"),
)

_FAMILIES = {"torch": torch_ops, "cpu": cpu, "triton": triton}


def _mode() -> str:
    if not torch.compiler.is_compiling():
        return "eager"
    return "exporting" if _exporting() else "compiled"


@torch.compiler.assume_constant_result
def _exporting() -> bool:
    """Whether ``torch.export`` is tracing. Run as Python while dynamo traces (its answer a
    constant of the graph), so that it reads the process's state, not dynamo's view of it."""
    # The flag, not torch.compiler.is_exporting(), which dynamo folds to True under
    # torch.compile too. Torch 2.7 sets the flag only after dynamo's part of a strict export;
    # there the translator running dynamo says it is exporting.
    if torch.compiler._is_exporting_flag:
        return True
    from torch._dynamo.symbolic_convert import InstructionTranslator

    try:
        return bool(InstructionTranslator.current_tx().export)
    except AttributeError:  # no translator: not under dynamo (a non-strict export says so above)
        return False


def _decide(case: Case) -> str:
    for mode, device, dtypes, dense, spatial, fused, name in _TABLE:
        if (
            mode in (None, case.mode)
            and device in (None, case.device)
            and (dtypes is None or case.dtype in dtypes)
            and dense in (None, case.dense)
            and spatial in (None, case.spatial)
            and fused in (None, case.fused)
            and (name == "torch" or _runs_here(name, case.device))
        ):
            return name
    return "torch"


@torch.compiler.assume_constant_result
def _runs_here(name: str, device: str) -> bool:
    """:func:`_usable`, run as Python while dynamo traces (a constant of the graph): finding the
    kernels may build them, which dynamo cannot trace."""
    return _usable(name, device)


# Eager calls look their case up; under torch.compile _decide runs uncached, once per trace
# (dynamo does not trace into lru_cache'd functions).
_auto = functools.cache(_decide)


#: The input dtypes each kernel family reads.
_KERNEL_DTYPES = {"cpu": _CPU_DTYPES, "triton": _TRITON_DTYPES}


def _devices(name: str) -> tuple[str, ...]:
    """The device types kernel family ``name`` runs on (Triton on the CPU only interpreted)."""
    if name == "cpu":
        return ("cpu",)
    return ("cuda", "cpu") if triton.interpreting() else ("cuda",)


def _installed(name: str) -> bool:
    """Whether kernel family ``name`` can run in this process (building what it needs)."""
    return cpu.available() if name == "cpu" else triton.available()


@functools.cache
def _usable(name: str, device: str) -> bool:
    """Whether kernel family ``name`` can run on ``device`` in this process."""
    return device in _devices(name) and _installed(name)


def _implementation(name: str, mode: str) -> Backend:
    family = _FAMILIES[name]
    if mode == "eager":
        return family.EAGER  # type: ignore[no-any-return]
    if name == "torch" and mode == "exporting":
        return torch_ops.EXPORTING
    return family.COMPILED  # type: ignore[no-any-return]


def implementation_for(
    xg: Tensor, backend: str = "auto", layer: str = "", *, fused: bool = False
) -> Backend:
    """The implementation that runs a call on the grouped view ``xg`` (with a fused epilogue
    where ``fused``): ``backend``'s, or with ``"auto"`` the first matching row of the table
    above. Under ``torch.compile`` the choice is made while tracing, from ``xg``'s dtype and
    layout (which may be symbolic)."""
    if torch.compiler.is_compiling():
        # The compiled rows do not ask for the layout: not tested (under tracing each test adds
        # guards on the strides), and the custom ops make any layout dense themselves.
        case = Case(_mode(), xg.device.type, xg.dtype, None, xg.dim() > 3, fused)
        name = _decide(case) if backend == "auto" else backend
    elif type(xg) not in (Tensor, torch.nn.Parameter):
        # A tensor subclass (an un-waited functional collective, a DTensor) is not memory the
        # kernels can read; torch ops dispatch through it (waiting for a collective first).
        if backend in ("cpu", "triton"):
            raise ValueError(
                f"fxghost: layer '{layer}' runs with backend='{backend}', whose kernels cannot "
                f"read {type(xg).__name__}, a tensor subclass; use backend='auto' (or "
                "'torch'), or pass a plain tensor (wait for a functional collective first)"
            )
        return _implementation("torch", "eager")
    else:
        dense = dims_of(tuple(xg.shape), xg.stride()) is not None
        case = Case("eager", xg.device.type, xg.dtype, dense, xg.dim() > 3, fused)
        name = _auto(case) if backend == "auto" else backend
    if name != "torch" and backend != "auto":
        _check_case(name, case, layer)
    return _implementation(name, case.mode)


def _check_case(name: str, case: Case, layer: str) -> None:
    """A chosen backend that cannot take this input: say which layer, and what can."""
    if case.dtype not in _KERNEL_DTYPES[name] or case.device not in _devices(name):
        raise ValueError(
            f"fxghost: layer '{layer}' runs with backend='{name}', which cannot take a "
            f"{case.device} {case.dtype} input; use backend='auto' (or 'torch', which runs "
            "anywhere)"
        )


#: What each kernel family needs, for :func:`check`'s error.
_NEEDS = {
    "cpu": "the CPU kernels, which could not be compiled here (install a C compiler such as gcc; "
    "`python -m fxghost build` shows the error)",
    "triton": "Triton and a CUDA device (or TRITON_INTERPRET=1 set before importing triton, to "
    "run its interpreter on the CPU)",
}


def check(backend: object) -> str:
    """``backend`` as a name this process can run, at transform time: a ``ValueError``
    (unknown name) or ``RuntimeError`` (cannot run here) that says why and what to use."""
    if not isinstance(backend, str) or backend not in NAMES:
        raise ValueError(f"fxghost: backend={backend!r}; choose one of {', '.join(NAMES)}")
    if backend in _KERNEL_DTYPES and not (
        _installed(backend)
        and any(d == "cpu" or torch.cuda.is_available() for d in _devices(backend))
    ):
        raise RuntimeError(
            f"fxghost: backend='{backend}' needs {_NEEDS[backend]}; use backend='auto' or 'torch'"
        )
    return backend


#: The attribute of the layer passed to the ghost ops that says which implementation ran its
#: last call: state of the layer, so that copies, pickles and new models report their own.
LAST_RUN_ATTR = "_fxghost_last_run"


def record(layer: torch.nn.Module, implementation: Backend) -> None:
    if torch.compiler.is_compiling():
        set_while_tracing(layer, LAST_RUN_ATTR, implementation.label)
    else:
        layer.__dict__[LAST_RUN_ATTR] = implementation.label


def set_while_tracing(layer: torch.nn.Module, attr: str, value: str) -> None:
    """``layer.__dict__[attr] = value`` from code that dynamo traces, done once while it traces
    and not by the compiled code: an attribute store there would be a side effect that the
    compiled code replays on every call."""
    # The layer's id, not the layer: dynamo in torch 2.11 and older passes only constants to a
    # function marked assume_constant_result (a module there fails the compile).
    _set_by_id(id(layer), attr, value)


@torch.compiler.assume_constant_result
def _set_by_id(layer_id: int, attr: str, value: str) -> bool:
    # Runs while dynamo traces, when the id names a live layer: the traced module holds it.
    ctypes.cast(layer_id, ctypes.py_object).value.__dict__[attr] = value
    return True


def last_run(layer: torch.nn.Module | None) -> str:
    """The label of the implementation that ran ``layer``'s last call (``""`` before any)."""
    return "" if layer is None else str(layer.__dict__.get(LAST_RUN_ATTR, ""))
