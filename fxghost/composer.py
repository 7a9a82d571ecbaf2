"""Ghost BatchNorm for MosaicML Composer: one algorithm, in place of Composer's own.

``Trainer(algorithms=[fxghost.composer.GhostBatchNorm(ghost_batch_size=32)])`` replaces
``Trainer(algorithms=[composer.algorithms.GhostBatchNorm(ghost_batch_size=32)])``. What changes:
checkpoints keep plain BatchNorm keys (Composer's module surgery adds ``.batchnorm``), so they
load into a plain model and need no algorithm on load; eval is plain BatchNorm eval at any batch
size (Composer's raises for an eval batch smaller than the ghost size); each layer runs all of
its ghost batches at once instead of one BatchNorm call per ghost batch. In a plain loop,
``composer.functional.apply_ghost_batchnorm`` becomes
[`fxghost.apply_ghost_batchnorm`][fxghost.apply_ghost_batchnorm], with the same arguments. It
needs Composer (``pip install 'fxghost[composer]'``).
"""

from __future__ import annotations

import logging
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ._inplace import apply_ghost_batchnorm
from ._loader import check_batches, loader_shape
from ._plan import check_ghost_batch_size
from ._report import report

try:
    from composer.core import Algorithm, Event, TimeUnit
except ImportError:  # pragma: no cover - without Composer the class cannot be used
    Algorithm = object  # type: ignore[assignment,misc]
    Event = TimeUnit = None  # type: ignore[assignment,misc]

__all__ = ["FxGhostBatchNorm", "GhostBatchNorm"]

log = logging.getLogger(__name__)


class FxGhostBatchNorm(Algorithm):  # type: ignore[misc]
    """A Composer ``Algorithm`` that ghosts every BatchNorm of ``state.model`` at
    ``Event.INIT``, with [`fxghost.apply_ghost_batchnorm`][fxghost.apply_ghost_batchnorm]: the
    model keeps its object, its Parameters (optimizers need no re-binding) and its
    ``state_dict`` keys.

    Importable as ``fxghost.composer.GhostBatchNorm``. Its class is named otherwise because
    Composer records algorithms in checkpoints by class name and, when loading one, re-creates
    and applies *its own* algorithm of a recorded name if that algorithm is required on load, as
    Composer's ``GhostBatchNorm`` is: a checkpoint of this algorithm would then get Composer's
    module surgery. This one is not required on load: its checkpoints are a plain model's.

    A training batch smaller than the ghost size raises, as the chunked reference does; so that
    an epoch's short last batch does not raise after a whole epoch of training, the algorithm
    also runs at ``Event.FIT_START``, before the first training step, and checks the training
    dataloader: if the last batch on each device (from the dataset's length, ``batch_size``,
    ``drop_last`` and a ``DistributedSampler``'s sharding), or the smallest microbatch that
    ``device_train_microbatch_size`` splits a batch into, is smaller than the ghost size and
    training reaches it (within ``train_subset_num_batches`` and a ``max_duration`` in batches),
    a ``ValueError`` names the sizes and the fixes (``drop_last=True``, a smaller ghost size,
    another batch or microbatch size). A dataloader without that arithmetic (a custom batch
    sampler, an ``IterableDataset``) is not checked.

    Args:
        ghost_batch_size: samples per ghost batch, a positive int; it must not exceed the
            per-device microbatch.
        only: qualified layer names or glob patterns to rewrite (default: all), as for
            [`fxghost.transform`][fxghost.transform].

    Attributes:
        ghost_batch_size: samples per ghost batch.
        only: the layers to rewrite (``None``: all).

    Raises:
        ImportError: Composer is not installed.
        ValueError: ``ghost_batch_size`` is not a positive int; and, at ``Event.FIT_START``, a
            training batch or microbatch that the dataloader will give is smaller than it (see
            above).
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
        return bool(event in (Event.INIT, Event.FIT_START))

    def apply(self, event: Any, state: Any, logger: Any = None) -> None:
        if event == Event.FIT_START:
            self._check_loader(state)
            return
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

    def _check_loader(self, state: Any) -> None:
        model = state.model
        if isinstance(model, DistributedDataParallel):
            model = model.module  # wrapped after INIT, where the report was attached
        try:
            layers = len(report(model).rewritten)
        except ValueError:
            return  # not ghosted: every batch size trains
        if not layers:
            return
        shape = loader_shape(state.dataloader)
        microbatch = state.device_train_microbatch_size
        if shape is None or not isinstance(microbatch, int):
            # A float microbatch size is sequence parallelism's fraction of a sample.
            log.debug("%r: cannot tell the training batch sizes in advance", self)
            return
        batches = shape.num_batches
        if state.dataloader_len is not None and int(state.dataloader_len) < batches:
            return  # train_subset_num_batches ends each epoch before its last batch
        stamp = state.timestamp
        if state.max_duration is not None and state.max_duration.unit == TimeUnit.BATCH:
            last = int(stamp.batch) + batches - 1 - int(stamp.batch_in_epoch)
            if last >= state.max_duration.value:
                return  # training stops before the epoch's last batch
        check_batches(
            shape,
            self.ghost_batch_size,
            owner="fxghost.composer.GhostBatchNorm",
            layers=layers,
            # Auto microbatching starts at the whole batch and halves it on running out of
            # memory, at sizes that cannot be known here: check the whole batches.
            microbatch_size=None if state.auto_microbatching else microbatch,
            microbatch_name="device_train_microbatch_size",
        )


GhostBatchNorm = FxGhostBatchNorm
"""[`FxGhostBatchNorm`][fxghost.composer.FxGhostBatchNorm], under the name of Composer's own
algorithm, so that switching is one import."""
