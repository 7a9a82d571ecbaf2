"""fxghost against the chunked reference: outputs, gradients, running statistics, eval."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BN_SHAPES, assert_same_state, input_shape, make_bn, run_side_by_side
from torch import nn

import fxghost
from fxghost.backends import cpu
from fxghost.reference import apply_chunked_ghost_batchnorm

KINDS = list(BN_SHAPES)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(
    params=[
        pytest.param(
            "auto", marks=pytest.mark.skipif(not cpu.available(), reason="no C compiler here")
        ),
        "torch",
    ],
)
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both CPU backends: "auto" (the compiled kernels where they take
    the input) and the torch ops that machines without a C compiler use."""
    return str(request.param)


# (N values for the training steps, g): divisible, uneven, fewer chunks than requested, g=1.
BATCHES = [
    ((12, 12), 4),
    ((10, 13), 3),  # 10 -> 4 chunks of 3,3,3,1 (1-sample tail); 13 -> 5,5,3
    ((6, 7), 2),  # 7 -> 2,2,2,1
    ((9, 8), 5),  # 9 -> 2 chunks of 5,4
    ((33, 64), 16),
    ((40, 32), 32),
    ((11, 4), 1),
    ((5, 6), 5),
]


def _expected_error(kind: str, ns: tuple[int, ...], g: int) -> bool:
    """Whether some step leaves a ghost batch with one value per channel (BatchNorm refuses it)."""
    per_sample = 1
    for s in BN_SHAPES[kind][1][1:]:
        per_sample *= s
    for n in ns:
        chunks = torch.arange(n).chunk(-(-n // g))
        if min(len(c) for c in chunks) * per_sample == 1:
            return True
    return False


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("ns", "g"), BATCHES)
@pytest.mark.parametrize("momentum", [0.1, None, 0.7])
def test_matches_reference_float64(
    kind: str, ns: tuple[int, ...], g: int, momentum: float | None, backend: str
) -> None:
    bn = make_bn(kind, momentum=momentum)
    model = nn.Sequential(bn)
    train = [input_shape(kind, n) for n in ns]
    evals = [input_shape(kind, 3), input_shape(kind, 17)]
    if _expected_error(kind, ns, g):
        with pytest.raises(ValueError, match="single value per channel"):
            run_side_by_side(model, g, train, evals, backend=backend)
        return
    run_side_by_side(model, g, train, evals, backend=backend)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flags_and_layouts(
    kind: str, affine: bool, track: bool, channels_last: bool, dtype: torch.dtype, backend: str
) -> None:
    if channels_last and kind not in ("2d", "3d"):
        pytest.skip("channels_last applies to 4D and 5D inputs")
    bn = make_bn(kind, dtype=dtype, affine=affine, track_running_stats=track, eps=1e-3)
    model = nn.Sequential(bn)
    # Without running statistics, eval also ghost-normalizes; an eval batch smaller than g is one
    # ghost batch.
    run_side_by_side(
        model,
        4,
        [input_shape(kind, 12), input_shape(kind, 10)],
        [input_shape(kind, 3), input_shape(kind, 9)],
        dtype=dtype,
        channels_last=channels_last,
        backend=backend,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["1d_NC", "2d"])
def test_16bit_inputs_keep_dtype_and_fp32_stats(
    dtype: torch.dtype, kind: str, backend: str
) -> None:
    # 16-bit activations with float32 parameters and buffers, as under autocast. Against float64:
    # the output and input gradient to within ULP_TOL of their rounding, the float32 running
    # statistics and parameter gradients to float32 accuracy (16-bit accumulation fails it).
    bn = make_bn(kind, dtype=torch.float32)
    model = nn.Sequential(bn)
    run_side_by_side(
        model, 4, [input_shape(kind, 16), input_shape(kind, 10)], dtype=dtype, backend=backend
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_model_end_to_end(dtype: torch.dtype, backend: str) -> None:
    # The whole layer in 16 bits (parameters and buffers too).
    bn = make_bn("2d", dtype=dtype)
    run_side_by_side(
        nn.Sequential(bn),
        3,
        [input_shape("2d", 9)],
        [input_shape("2d", 2)],
        dtype=dtype,
        backend=backend,
    )


def test_momentum_change_at_run_time_is_honoured(backend: str) -> None:
    bn = make_bn("2d", momentum=0.1)
    model = nn.Sequential(bn)
    gm = fxghost.transform(model, 4, backend=backend)
    bn.momentum = 0.5  # e.g. a momentum schedule: BatchNorm reads it at every forward
    run_side_by_side(model, 4, [input_shape("2d", 12)], transformed=gm)


def test_per_layer_eval_is_honoured(backend: str) -> None:
    # Freezing one BatchNorm with bn.eval() (common when fine-tuning) acts as in the reference.
    model = nn.Sequential(make_bn("2d"), nn.ReLU(), make_bn("2d"))
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = fxghost.transform(model, 4, backend=backend)
    gm.train()
    reference.train()
    model[2].eval()
    reference[2].bn.eval()
    frozen = model[2].running_mean.clone()
    x = torch.randn(12, 4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(gm(x), reference(x), rtol=1e-9, atol=1e-10)
    assert torch.equal(model[2].running_mean, frozen)
    assert_same_state(model, reference, "after a step with one layer frozen")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_op_after_the_layer(dtype: torch.dtype, channels_last: bool, backend: str) -> None:
    # ReLU(inplace=True) right after BatchNorm, as in torchvision's ResNets.
    model = nn.Sequential(
        make_bn("2d", dtype=torch.float32 if dtype != torch.float64 else dtype),
        nn.ReLU(inplace=True),
    )
    run_side_by_side(
        model,
        4,
        [input_shape("2d", 12), input_shape("2d", 10)],
        [input_shape("2d", 3)],
        dtype=dtype,
        channels_last=channels_last,
        backend=backend,
    )


def test_non_dense_input(backend: str) -> None:
    # A strided slice (every other sample) is neither contiguous nor channels_last.
    model = nn.Sequential(make_bn("2d"))
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = fxghost.transform(model, 4, backend=backend)
    base = torch.randn(24, 4, 5, 3, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    x = base[::2].requires_grad_()
    y, y_ref = gm(x), reference(x)
    torch.testing.assert_close(y, y_ref)
    (g1,) = torch.autograd.grad(y.sum() + y.pow(2).sum(), x)
    (g2,) = torch.autograd.grad(y_ref.sum() + y_ref.pow(2).sum(), x)
    torch.testing.assert_close(g1, g2)
