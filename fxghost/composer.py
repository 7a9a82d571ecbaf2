"""Ghost BatchNorm for MosaicML Composer: one algorithm, in place of Composer's own.

``Trainer(algorithms=[fxghost.composer.GhostBatchNorm(ghost_batch_size=32)])`` replaces
``Trainer(algorithms=[composer.algorithms.GhostBatchNorm(ghost_batch_size=32)])``. What changes:
checkpoints keep plain BatchNorm keys (Composer's module surgery adds ``.batchnorm``), so they
load into a plain model and need no algorithm on load; eval is plain BatchNorm eval at any batch
size (Composer's raises for an eval batch smaller than the ghost size); each layer runs all of
its ghost batches at once instead of one BatchNorm call per ghost batch. In a plain loop,
``composer.functional.apply_ghost_batchnorm`` becomes :func:`fxghost.apply_ghost_batchnorm`, with
the same arguments. It needs Composer (``pip install 'fxghost[composer]'``).
"""

from __future__ import annotations

import logging
from typing import Any

from ._inplace import apply_ghost_batchnorm
from ._plan import check_ghost_batch_size
from ._report import report

try:
    from composer.core import Algorithm, Event
except ImportError:  # pragma: no cover - without Composer the class cannot be used
    Algorithm = object  # type: ignore[assignment,misc]
    Event = None  # type: ignore[assignment,misc]

__all__ = ["FxGhostBatchNorm", "GhostBatchNorm"]

log = logging.getLogger(__name__)


class FxGhostBatchNorm(Algorithm):  # type: ignore[misc]
    """A Composer ``Algorithm`` that ghosts every BatchNorm of ``state.model`` at
    ``Event.INIT``, with :func:`fxghost.apply_ghost_batchnorm`: the model keeps its object, its
    Parameters (optimizers need no re-binding) and its ``state_dict`` keys.

    Importable as ``fxghost.composer.GhostBatchNorm``. Its class is named otherwise because
    Composer records algorithms in checkpoints by class name and, when loading one, re-creates
    and applies *its own* algorithm of a recorded name if that algorithm is required on load, as
    Composer's ``GhostBatchNorm`` is: a checkpoint of this algorithm would then get Composer's
    module surgery. This one is not required on load: its checkpoints are a plain model's.

    Args:
        ghost_batch_size: samples per ghost batch, a positive int; it must not exceed the
            per-device microbatch.
        only: qualified layer names or glob patterns to rewrite (default: all), as for
            :func:`fxghost.transform`.
    """

    def __init__(self, ghost_batch_size: int = 32, *, only: Any = None) -> None:
        if Event is None:
            raise ImportError(
                "fxghost.composer.GhostBatchNorm needs MosaicML Composer: "
                "pip install 'fxghost[composer]'"
            )
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)
        self.only = only

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ghost_batch_size={self.ghost_batch_size})"

    @staticmethod
    def required_on_load() -> bool:
        return False  # plain state_dict keys: nothing to redo before loading a checkpoint

    def match(self, event: Any, state: Any) -> bool:
        return bool(event == Event.INIT)

    def apply(self, event: Any, state: Any, logger: Any = None) -> None:
        if state.model is None:
            raise ValueError("fxghost.composer.GhostBatchNorm: the Trainer's state has no model")
        apply_ghost_batchnorm(
            state.model, self.ghost_batch_size, optimizers=state.optimizers, only=self.only
        )
        rewritten = len(report(state.model).rewritten)
        log.info(
            "Applied %r to %s: %d BatchNorm layer(s) ghosted",
            self,
            type(state.model).__name__,
            rewritten,
        )
        if logger is not None:
            logger.log_hyperparameters({"FxGhostBatchNorm/num_ghosted_layers": rewritten})


GhostBatchNorm = FxGhostBatchNorm
