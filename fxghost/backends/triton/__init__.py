"""The Triton backend: fused kernels for ghost BatchNorm on a grouped view ``(G, c, C, *spatial)``
(CUDA, float32, float16, bfloat16; on the CPU only under ``TRITON_INTERPRET=1``).

One module per job:

- :mod:`.kernels`: the ``@triton.jit`` kernels, and whether Triton is installed
  (:func:`available`) and interpreting (:func:`interpreting`);
- :mod:`.launch`: how a grouped view is tiled and launched, cached per shape
  (:class:`~.launch.LaunchPlan`), and the launcher that skips Triton's per-call dispatch;
- :mod:`.host`: the host functions, one per job of the kernels (statistics, normalization
  with its optional ReLU and residual-add epilogue, backward sums, input gradient);
- :mod:`.function`: the autograd Function, the custom ops for ``torch.compile``, and the
  backend objects :data:`EAGER` and :data:`COMPILED`.

Triton is optional: without it this package still imports, and :func:`available` and
:func:`supported` are False.
"""

from __future__ import annotations

from .function import COMPILED, EAGER
from .host import (
    RunningUpdate,
    backward_apply,
    backward_apply_masked,
    backward_reduce,
    backward_sums,
    forward_stats,
    normalize,
    stats,
)
from .kernels import available, interpreting
from .launch import supported

__all__ = [
    "COMPILED",
    "EAGER",
    "RunningUpdate",
    "available",
    "backward_apply",
    "backward_apply_masked",
    "backward_reduce",
    "backward_sums",
    "forward_stats",
    "interpreting",
    "normalize",
    "stats",
    "supported",
]
