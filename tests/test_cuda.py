"""CUDA-only checks, skipped without a GPU: torch.compile on CUDA (inductor's Triton code) and the
eager Triton path through whole models, against the chunked reference.

The kernel-level checks of ``test_triton.py`` and the pass-level ones of ``test_triton_path.py``
run on CUDA too, with ``FXGHOST_TEST_DEVICE=cuda`` (see ``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import assert_close, input_shape, make_bn, run_side_by_side
from torch import nn

import fxghost
from fxghost import backends
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("kind", "dtype", "channels_last", "ns"),
    [
        ("2d", torch.bfloat16, True, [12, 9]),  # 9: a tail ghost batch
        ("2d", torch.float32, False, [12]),
        ("1d_NC", torch.float32, False, [64, 50]),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiled_matches_reference(
    kind: str, dtype: torch.dtype, channels_last: bool, ns: list[int], backend: str
) -> None:
    """Inductor's CUDA code for the decomposition ("auto"), or the Triton kernels as custom ops
    ("triton"): outputs, gradients and running statistics."""
    model = nn.Sequential(make_bn(kind, dtype=torch.float32), nn.ReLU()).to(CUDA)
    compiled = torch.compile(fxghost.transform(model, 4, backend=backend), fullgraph=True)
    run_side_by_side(
        model,
        4,
        [input_shape(kind, n) for n in ns],
        [input_shape(kind, 3)],
        dtype=dtype,
        channels_last=channels_last,
        transformed=compiled,
        device=CUDA,
    )


def test_eager_cuda_takes_the_triton_kernels() -> None:
    x = torch.randn(8, 4, 3, 3, device=CUDA).view(2, 4, 4, 3, 3)
    assert backends.implementation_for(x) is backends.triton.EAGER


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_resnet18_step_matches_reference(
    compiled: bool, bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training step of a real model laid out as the benchmark runs it (channels_last, bf16
    autocast or not), against the chunked reference under the same autocast: the loss, the first
    convolution's gradient and every BatchNorm buffer. In float32 the tolerances are float32
    rounding amplified through 20 layers (with TF32 convolutions, cuDNN's default, the first
    layer's gradient differed by 7%); bf16 activations carry about 3 significant digits."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", bf16)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(CUDA, memory_format=torch.channels_last)
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 8)
    gm = fxghost.transform(model, 8)
    run = torch.compile(gm, fullgraph=True) if compiled else gm
    x = torch.randn(32, 3, 64, 64, device=CUDA).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (32,), device=CUDA)
    losses = []
    for net in (run, reference):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(net(x), target)
        loss.backward()
        losses.append(loss.detach().float())
    tol = 3e-2 if bf16 else 2e-3  # relative, of norms
    assert_close(losses[0], losses[1], "loss", {"rtol": tol, "atol": 0.0})
    grad_err = _rel(model.conv1.weight.grad, reference.conv1.weight.grad)
    # Random-init gradients at the first layer largely cancel; bf16 noise dominates them.
    assert grad_err < (0.5 if bf16 else 2e-2), f"conv1 grad: relative error {grad_err:.3g}"
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        if a.dtype == torch.long:
            assert torch.equal(a, b), name
        else:
            assert _rel(a, b) < tol, f"buffer {name}: relative error {_rel(a, b):.3g}"
