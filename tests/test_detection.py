"""torchvision detection models do not trace as a whole: their traceable parts are rewritten."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from conftest import assert_close

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

TOL = {"rtol": 1e-7, "atol": 1e-9}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_detection_model_rewrites_its_backbone() -> None:
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=64,
        max_size=96,
    ).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BatchNorm is ghosted: no warning
        result = fxghost.transform(model, 2)
    rep = fxghost.report(result)
    assert rep.untraced and rep.untraced[0].name == "(root)"
    assert len(rep.rewritten) == sum(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert all(name.startswith("backbone.") for name in rep.rewritten_names)
    assert set(result.state_dict()) == set(model.state_dict())
    # Training-mode backbone features against the chunked reference.
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 2)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    result.train()
    reference.train()
    feats, feats_ref = result.backbone(x), reference.backbone(x)
    for key in feats_ref:
        assert_close(feats[key], feats_ref[key], f"backbone feature {key}", TOL)
    # Whole-model inference (eval: plain BatchNorm with running statistics) as the original.
    result.eval()
    model.eval()
    images = [torch.rand(3, 80, 96, dtype=torch.float64)]
    with torch.no_grad():
        out, out_ref = result(images)[0], model(images)[0]
    assert_close(out["boxes"], out_ref["boxes"], "boxes", TOL)
    assert_close(out["scores"], out_ref["scores"], "scores", TOL)
