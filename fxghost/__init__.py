"""fxghost: ghost BatchNorm as a torch.fx graph pass.

Examples:
    >>> import torch, fxghost
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    ... )
    >>> gm = fxghost.transform(model, ghost_batch_size=4)
    >>> gm(torch.randn(10, 3, 8, 8)).shape      # ghost batches of 4, 4 and 2 samples
    torch.Size([10, 8, 6, 6])
    >>> int(model[1].num_batches_tracked)       # the original layer's statistics were updated
    3
"""

from __future__ import annotations

from ._api import PartialRewriteWarning, ghost_batchnorm_pass, transform
from ._inplace import apply_ghost_batchnorm, revert_ghost_batchnorm
from ._plan import InputDtypeError
from ._report import GhostReport, LayerRecord, report
from ._scope import UntracedPart
from ._select import register_batchnorm
from ._trace import GhostTracer, TracingError
from ._version import __version__

__all__ = [
    "GhostReport",
    "GhostTracer",
    "InputDtypeError",
    "LayerRecord",
    "PartialRewriteWarning",
    "TracingError",
    "UntracedPart",
    "__version__",
    "apply_ghost_batchnorm",
    "ghost_batchnorm_pass",
    "register_batchnorm",
    "report",
    "revert_ghost_batchnorm",
    "transform",
]
