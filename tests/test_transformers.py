"""HuggingFace ``transformers`` vision models with BatchNorm, built from small configs with random
weights (nothing is downloaded): every BatchNorm ghosted, a float64 training step equal to the
chunked reference, eval equal to the plain model, and ``save_pretrained``/``from_pretrained``.

None of these models traces as a whole (their forwards branch on arguments and read shapes), so
they exercise the rewrite that follows the module tree.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_state_scaled
from torch import nn

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

T = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

# Relative to each tensor's largest value: float64 through a dozen layers with ghost batches of
# 4 samples on small maps rounds at about 1e-12 of a tensor's scale.
REL = 1e-8

CONFIGS: dict[str, Callable[[], tuple[object, type]]] = {
    "resnet": lambda: (
        T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        T.ResNetForImageClassification,
    ),
    "regnet": lambda: (
        T.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3
        ),
        T.RegNetForImageClassification,
    ),
    "mobilenet_v1": lambda: (
        T.MobileNetV1Config(depth_multiplier=0.25, num_labels=3, image_size=32),
        T.MobileNetV1ForImageClassification,
    ),
    "mobilenet_v2": lambda: (
        T.MobileNetV2Config(depth_multiplier=0.25, num_labels=3, image_size=32),
        T.MobileNetV2ForImageClassification,
    ),
    "efficientnet": lambda: (
        T.EfficientNetConfig(
            width_coefficient=0.1,
            depth_coefficient=0.1,
            num_labels=3,
            image_size=32,
            hidden_dim=128,
        ),
        T.EfficientNetForImageClassification,
    ),
    "mobilevit": lambda: (
        T.MobileViTConfig(
            image_size=32,
            hidden_sizes=[16, 16, 16],
            neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64],
            num_labels=3,
            num_attention_heads=2,
        ),
        T.MobileViTForImageClassification,
    ),
    "levit": lambda: (
        T.LevitConfig(
            image_size=32,
            hidden_sizes=[16, 24, 32],
            num_attention_heads=[1, 1, 1],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
            num_labels=3,
        ),
        T.LevitForImageClassification,
    ),
}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # dropout draws the same masks in both models
    return model(pixel_values=x).logits  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_huggingface_model_matches_reference(name: str, tmp_path: Path) -> None:
    config, cls = CONFIGS[name]()
    torch.manual_seed(0)
    model = cls(config).double().train()
    n_batchnorm = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxghost.PartialRewriteWarning)
        result = fxghost.transform(model, 4)
    rep = fxghost.report(result)
    assert len(rep.rewritten) == n_batchnorm > 0, rep.table()
    assert list(result.state_dict()) == list(model.state_dict())

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 32, 32, generator=gen, dtype=torch.float64)  # ghost batches 4, 3, 3
    out, out_ref = _logits(result, x), _logits(reference, x)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    torch.testing.assert_close(out, out_ref, rtol=REL, atol=REL * out_ref.abs().max().item())
    assert_state_scaled(model, reference, f"{name} after a training step", REL)

    result.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_logits(result, x[:3]), _logits(model, x[:3]))

    # The result is still the model's own class (its forward kept as Python): a PreTrainedModel
    # that saves, and loads into a fresh plain model, with every tensor.
    assert isinstance(result, cls)
    result.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, torch_dtype=torch.float64)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
