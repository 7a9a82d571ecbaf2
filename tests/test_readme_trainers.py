"""The Trainers page of the documentation, docs/trainers.md, runs as written: each python block is
executed with small stand-ins for the names it takes from the reader (``model``, ``loader``,
``lit_model``...), and the torchrun line is the command tests/test_torchrun.py runs. Composer's
block runs in Composer's own environment (tests/composer/test_composer.py). The file keeps its
name, from when the page was a section of the README: tests/composer imports it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_classifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PAGE = "docs/trainers.md"
#: Which block is which, by what it imports.
KINDS = {
    "lightning": "import lightning",
    "composer": "import fxghost.composer",
    "transformers": "from transformers import",
    "accelerate": "from accelerate import",
}
G = 32  # the page's ghost size
N = 2 * 64  # two batches of 64: two ghost batches of 32 each


def section() -> str:
    return (Path(__file__).resolve().parents[1] / PAGE).read_text()


def blocks(language: str = "python") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.S)


def block(kind: str) -> str:
    """The python block of ``kind`` (a key of KINDS, or "plain" for the one importing none)."""
    found = [
        b
        for b in blocks()
        if (kind == "plain" and not any(k in b for k in KINDS.values()))
        or (kind != "plain" and KINDS[kind] in b)
    ]
    assert len(found) == 1, f"{kind}: {len(found)} blocks"
    return found[0]


def run_block(kind: str, names: dict[str, Any]) -> dict[str, Any]:
    namespace = dict(names)
    exec(compile(block(kind), f"{PAGE} ({kind} block)", "exec"), namespace)
    return namespace


def loader(n: int = N, batch_size: int = 64) -> DataLoader:  # type: ignore[type-arg]
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,)))
    return DataLoader(data, batch_size=batch_size)


def ghost_batches(bn: nn.Module) -> int:
    return int(bn.num_batches_tracked)


def test_every_block_is_known() -> None:
    kinds = ["plain", *KINDS]
    assert len(blocks()) == len(kinds)
    for kind in kinds:
        block(kind)


def test_plain_loop(one_thread: None) -> None:
    model = small_classifier()
    run_block("plain", {"model": model, "loader": loader()})
    assert isinstance(model[1], nn.BatchNorm2d)  # reverted: the plain layer, trained
    assert ghost_batches(model[1]) == 4  # two steps of two ghost batches


def test_lightning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    L = pytest.importorskip("lightning.pytorch")

    class LitModel(L.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = small_classifier()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.chdir(tmp_path)  # Lightning's logs and checkpoints
    lit = LitModel()
    # Validation batches of 16, below the ghost size: plain eval.
    run_block(
        "lightning",
        {"lit_model": lit, "train_loader": loader(), "val_loader": loader(32, batch_size=16)},
    )
    assert isinstance(lit.net[1], nn.BatchNorm2d)
    assert ghost_batches(lit.net[1]) == 4


def test_huggingface_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    T = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Images(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 32, 32, generator=gen), "labels": i % 3}

    config = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = T.ResNetForImageClassification(config)
    monkeypatch.chdir(tmp_path)  # the Trainer's output_dir, "out"
    run_block("transformers", {"model": model, "train_set": Images()})
    bn = model.resnet.embedder.embedder.normalization
    assert ghost_batches(bn) == 2  # one step of 64 samples
    loaded = T.ResNetForImageClassification.from_pretrained(tmp_path / "out" / "final")
    assert torch.equal(loaded.resnet.embedder.embedder.normalization.running_mean, bn.running_mean)


def test_accelerate(one_thread: None) -> None:
    pytest.importorskip("accelerate")
    model = small_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_block("accelerate", {"model": model, "opt": opt, "loader": loader()})
    assert ghost_batches(model[1]) == 4
    assert fxghost_report_names(model) == ["1"]


def fxghost_report_names(model: nn.Module) -> list[str]:
    import fxghost

    return fxghost.report(model).rewritten_names


def test_torchrun_line_is_the_tested_command() -> None:
    from test_torchrun import README_COMMAND

    (commands,) = blocks("bash")
    assert commands.splitlines()[0] == README_COMMAND
    assert all(line.startswith("torchrun ") for line in commands.splitlines())
