"""timm models (optional dependency): BatchNormAct2d rewritten, timm's tracer rules, reference."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, assert_same_state

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

timm = pytest.importorskip("timm")

MODEL_TOL = {"rtol": 1e-7, "atol": 1e-9}

# One small member per family; convnext has no BatchNorm (nothing to rewrite).
FAMILIES = [
    "resnet10t",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "regnetx_002",
    "densenet121",
    "ghostnet_100",
    "rexnet_100",
    "mixnet_s",
    "cspresnet50",
    "dla34",
    "ese_vovnet19b_dw",
    "tinynet_e",
    "convnext_atto",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_model_matches_reference(name: str) -> None:
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=5, drop_path_rate=0.0)
    except TypeError:  # families without stochastic depth
        model = timm.create_model(name, pretrained=False, num_classes=5)
    model = model.double()
    g = 3
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), g)
    gm = fxghost.transform(model, g, strict=True)
    rep = fxghost.report(gm)
    kinds = {r.kind for r in rep.rewritten}
    bn_like = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert len(rep.rewritten) == len(bn_like), rep.table()
    if name == "convnext_atto":
        assert rep.rewritten == []
    if any(type(m).__name__ == "BatchNormAct2d" for m in bn_like):
        assert "BatchNormAct2d" in kinds
    x = torch.randn(6, 3, 64, 64, dtype=torch.float64)
    torch.manual_seed(1)  # head dropout draws the same mask in both
    out = gm(x)
    torch.manual_seed(1)
    out_ref = reference(x)
    assert_close(out, out_ref, f"{name}: output", MODEL_TOL)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    assert_same_state(model, reference, f"{name}: after a step", MODEL_TOL)
    gm.eval()
    reference.eval()
    small = x[:2]
    assert_close(gm(small), reference(small), f"{name}: eval", MODEL_TOL)
    # The training flag is read at run time (a plain trace would freeze it inside BatchNormAct2d).
    assert_close(gm(small), model.eval()(small), f"{name}: eval vs original", MODEL_TOL)
