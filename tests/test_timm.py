"""timm models (optional dependency): BatchNormAct2d rewritten, timm's tracer rules, reference."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from conftest import assert_close, assert_state_scaled

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")

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

# Every family whose tracer rules (timm's register_notrace_module) make a module holding
# BatchNorms a leaf: those BatchNorms are ghosted below the leaf, which stays Python code.
LEAF_FAMILIES = [
    "mobilevit_xxs",  # MobileVitBlock
    "mobilevitv2_050",  # MobileVitV2Block
    "efficientvit_b0",  # LiteMLA
    "efficientvit_m0",  # LocalWindowAttention
    "tiny_vit_5m_224",  # TinyVitBlock
    "cpubone_b0_bfrobust",  # ConvAttention
    "lowformer_b0",  # ConvAttention
]

# More architectures for the whole-suite run (FXGHOST_ALL_MODELS=1): with the lists above, 44.
MORE = [
    "resnet18d",
    "seresnext26d_32x4d",
    "resnest14d",
    "res2net50_14w_8s",
    "gernet_s",
    "repvgg_a0",
    "mobileone_s0",
    "fastvit_t8",
    "mobilenetv2_050",
    "efficientnet_lite0",
    "ghostnetv2_100",
    "repghostnet_050",
    "hgnetv2_b0",
    "selecsls42b",
    "hrnet_w18_small",
    "lcnet_050",
    "dpn68",
    "tf_efficientnet_b0",
    "spnasnet_100",
    "fbnetc_100",
    "hardcorenas_a",
    "semnasnet_050",
    "cspdarknet53",
    "mobilenetv4_conv_small",
]

ALL_MODELS = os.environ.get("FXGHOST_ALL_MODELS") == "1"


def _whole_suite(names: list[str]) -> list[object]:
    skip = pytest.mark.skipif(not ALL_MODELS, reason="whole-suite run: FXGHOST_ALL_MODELS=1")
    return [pytest.param(n, marks=skip) for n in names]


@pytest.mark.parametrize("name", [*FAMILIES, *LEAF_FAMILIES, *_whole_suite(MORE)])
def test_timm_model_matches_reference(name: str) -> None:
    torch.manual_seed(0)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=5, drop_path_rate=0.0)
    except TypeError:  # families without stochastic depth
        model = timm.create_model(name, pretrained=False, num_classes=5)
    model = model.double()
    g = 3
    if name in LEAF_FAMILIES:
        assert any(
            isinstance(m, tuple(timm.layers.get_notrace_modules()))
            and any(isinstance(b, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for b in m.modules())
            for m in model.modules()
        ), f"{name} has no tracer leaf holding a BatchNorm: move it out of LEAF_FAMILIES"
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxghost.PartialRewriteWarning)
        gm = fxghost.transform(model, g, strict=True)
    rep = fxghost.report(gm)
    kinds = {r.kind for r in rep.rewritten}
    bn_like = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
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
    assert_state_scaled(model, reference, f"{name}: after a step", MODEL_TOL["rtol"])
    gm.eval()
    reference.eval()
    small = x[:2]
    assert_close(gm(small), reference(small), f"{name}: eval", MODEL_TOL)
    # The training flag is read at run time (a plain trace would freeze it inside BatchNormAct2d).
    assert_close(gm(small), model.eval()(small), f"{name}: eval vs original", MODEL_TOL)
