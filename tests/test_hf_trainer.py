"""HuggingFace: ``fxghost.apply_ghost_batchnorm`` on a ``transformers`` vision model (a random
ResNet config, nothing downloaded), trained by ``transformers.Trainer`` on CPU in float64, equals
the chunked reference trained by the same Trainer; the model stays a ``PreTrainedModel`` whose
``save_pretrained`` output loads into a fresh plain model with ``from_pretrained``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_state_scaled
from torch import nn

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

T = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

pytestmark = pytest.mark.usefixtures("one_thread")

G = 4
BATCH = 10  # ghost batches of 4, 3 and 3 samples
STEPS = 3
REL = 1e-8  # float64 through a dozen layers on small maps: ~1e-12 of each tensor's scale


class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Random float64 images and labels, as dicts of the model's argument names."""

    def __init__(self, n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
        self.y = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class LastGrads(T.TrainerCallback):  # type: ignore[misc]
    """The gradients the optimizer stepped with last (the Trainer zeroes them after the step)."""

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.grads = [p.grad.clone() for p in kwargs["model"].parameters()]


def make_model() -> nn.Module:
    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    return T.ResNetForImageClassification(config).double()


def train(model: nn.Module, out: Path) -> None:
    args = T.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    spy = LastGrads()
    T.Trainer(model=model, args=args, train_dataset=Images(STEPS * BATCH), callbacks=[spy]).train()
    for p, g in zip(model.parameters(), spy.grads, strict=True):
        p.grad = g


def test_trainer_save_pretrained_from_pretrained(tmp_path: Path) -> None:
    model = make_model()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), G)
    assert fxghost.apply_ghost_batchnorm(model, ghost_batch_size=G) is model
    n_batchnorm = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    assert len(fxghost.report(model).rewritten) == n_batchnorm == 8

    train(model, tmp_path / "fxghost")
    train(reference, tmp_path / "reference")
    assert isinstance(model, T.ResNetForImageClassification)
    assert_state_scaled(model, reference, f"transformers.Trainer, after {STEPS} steps", REL)

    model.save_pretrained(tmp_path / "saved")
    loaded = T.ResNetForImageClassification.from_pretrained(
        tmp_path / "saved", torch_dtype=torch.float64
    )
    assert isinstance(loaded.resnet.embedder.embedder.normalization, nn.BatchNorm2d)
    trained = model.state_dict()
    assert sorted(loaded.state_dict()) == sorted(trained)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
