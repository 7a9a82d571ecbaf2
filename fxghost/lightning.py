"""Ghost BatchNorm for PyTorch Lightning: one callback.

``Trainer(callbacks=[fxghost.lightning.GhostBatchNorm(ghost_batch_size=32)])`` ghosts every
BatchNorm of the ``LightningModule`` for fitting. It needs the ``lightning`` package
(``pip install 'fxghost[lightning]'``) or the standalone ``pytorch_lightning``; the Trainers of
both call it (Lightning calls a callback's hooks by name).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ._inplace import apply_ghost_batchnorm, is_applied, revert_ghost_batchnorm
from ._loader import check_batches, loader_shape
from ._pass import holds_candidates
from ._plan import check_ghost_batch_size
from ._report import report

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the standalone package, or none
    try:
        from pytorch_lightning import Callback  # type: ignore[assignment]
    except ImportError:
        Callback = object  # type: ignore[assignment,misc]

__all__ = ["GhostBatchNorm"]

log = logging.getLogger(__name__)


class GhostBatchNorm(Callback):  # type: ignore[misc]
    """A Lightning ``Callback`` that trains the ``LightningModule`` with ghost BatchNorm.

    At ``setup`` for fitting (before Lightning converts the module's precision, moves it to the
    device, wraps it in DDP and builds the optimizers),
    [`fxghost.apply_ghost_batchnorm`][fxghost.apply_ghost_batchnorm] gives each BatchNorm layer
    of the module its ghost forward, in place: every module stays the same object of the same
    type (``configure_optimizers`` may index containers), with the same Parameters, buffers and
    ``state_dict`` keys. So training steps use ghost BatchNorm, validation, test and predict use
    plain BatchNorm eval (at any batch size), checkpoints written by ``ModelCheckpoint`` load into
    the plain module with ``strict=True``, and ``torch.compile`` and the ``ddp`` strategy work as
    without it (under DDP each process forms ghost batches from its own shard). Layers that
    ``configure_model`` creates are ghosted at ``on_fit_start``.

    When fitting ends (or fails), the layers get BatchNorm's own forward back, holding the
    trained weights and statistics, so the module is plain again for ``validate``, ``test`` or
    export.
    ``fxghost.report(pl_module)`` during fitting lists the layers ghosted.

    A training batch smaller than the ghost size raises, as the chunked reference does; so that
    an epoch's short last batch does not raise after a whole epoch of training, the training
    loader is checked at ``on_train_start`` (and at each epoch's start, for reloaded loaders),
    before the first training step: if the last batch on each process (from the dataset's
    length, ``batch_size``, ``drop_last`` and a ``DistributedSampler``'s sharding) is smaller
    than the ghost size and training reaches it (within ``limit_train_batches`` and
    ``max_steps``), a ``ValueError`` names the sizes and the fixes (``drop_last=True``, a smaller
    ghost size, or another batch size). A loader without that arithmetic (a custom batch
    sampler, an ``IterableDataset``) is not checked.

    Args:
        ghost_batch_size: samples per ghost batch, a positive int; it must not exceed the
            per-process training batch.
        only: qualified layer names or glob patterns to rewrite (default: all), as for
            [`fxghost.transform`][fxghost.transform].

    Attributes:
        ghost_batch_size: samples per ghost batch.
        only: the layers to rewrite (``None``: all).

    Raises:
        ImportError: neither ``lightning`` nor ``pytorch_lightning`` is installed.
        ValueError: ``ghost_batch_size`` is not a positive int; and, at ``on_train_start``, a
            training batch that the loader will give is smaller than it (see above).
    """

    def __init__(self, ghost_batch_size: int = 32, *, only: Any = None) -> None:
        if Callback is object:
            raise ImportError(
                "fxghost.lightning.GhostBatchNorm needs PyTorch Lightning: "
                "pip install 'fxghost[lightning]'"
            )
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)
        self.only = only
        # The modules this callback rewrote (and so reverts): not one the user had applied
        # fxghost to before fitting.
        self._applied: list[nn.Module] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ghost_batch_size={self.ghost_batch_size})"

    def _apply(self, pl_module: nn.Module) -> None:
        if is_applied(pl_module):
            # Applied already (by the user, or at setup): apply_ghost_batchnorm checks that the
            # settings agree and does nothing more.
            apply_ghost_batchnorm(pl_module, self.ghost_batch_size, only=self.only)
            return
        if not any(holds_candidates(child) for child in pl_module.children()):
            return  # nothing yet: configure_model may build the layers
        apply_ghost_batchnorm(pl_module, self.ghost_batch_size, only=self.only)
        self._applied.append(pl_module)

    def _revert(self) -> None:
        while self._applied:
            module = self._applied.pop()
            if is_applied(module):
                revert_ghost_batchnorm(module)

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage == "fit":
            self._apply(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not is_applied(pl_module):
            self._apply(pl_module)

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # The first hook after the fit loop has built the training loader (with Lightning's
        # DistributedSampler under DDP) and before any training step: on_fit_start is too early.
        self._check_loader(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        # reload_dataloaders_every_n_epochs builds a new loader just before this hook.
        self._check_loader(trainer, pl_module)

    def _check_loader(self, trainer: Any, pl_module: nn.Module) -> None:
        try:
            layers = len(report(pl_module).rewritten)
        except ValueError:
            return  # not ghosted: every batch size trains
        if not layers:
            return
        loader = trainer.train_dataloader
        shape = loader_shape(loader)
        if shape is None:
            log.debug("%r: cannot tell the training loader's batch sizes in advance", self)
            return
        batches = shape.num_batches
        if trainer.num_training_batches < batches:
            return  # limit_train_batches stops each epoch before its last batch
        if trainer.max_steps >= 0:
            # The steps before an epoch's last batch, one per accumulate_grad_batches batches,
            # counted from the epoch's start: fewer when resumed mid-epoch, where this can only
            # skip the check, never refuse a fit that would not reach a short batch.
            before = (batches - 1) // trainer.accumulate_grad_batches
            if trainer.global_step + before >= trainer.max_steps:
                return  # training stops before the last batch
        check_batches(
            shape, self.ghost_batch_size, owner="fxghost.lightning.GhostBatchNorm", layers=layers
        )

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if stage == "fit":
            self._revert()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        self._revert()
