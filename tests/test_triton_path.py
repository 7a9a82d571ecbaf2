"""The whole pass through the Triton kernels, against the chunked reference.

Runs on CPU under the Triton interpreter, in a subprocess (``TRITON_INTERPRET=1`` must be set
before triton is imported; see test_triton.py). On a GPU machine the same checks run on CUDA
tensors::

    FXGHOST_TEST_DEVICE=cuda python -m pytest tests/test_triton_path.py \
        -o python_functions=check_*
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DEVICE, input_shape, make_bn, run_checks_interpreted, run_side_by_side
from torch import nn

import fxghost

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_pass_through_interpreted_triton() -> None:
    run_checks_interpreted(__file__, timeout=900)


def _require_triton_path() -> None:
    from conftest import DEVICE

    from fxghost import backends

    x = torch.zeros(1, 2, 3, device=DEVICE)
    if backends.implementation_for(x, "triton") is not backends.triton.EAGER:
        pytest.fail(f"the Triton backend cannot take a float32 tensor on {DEVICE}")


CASES = [
    ("2d", False, torch.float32, (16, 10)),
    ("2d", True, torch.float32, (12, 9)),
    ("1d_NC", False, torch.float32, (8, 11)),
    ("2d", True, torch.bfloat16, (8, 6)),
    ("3d", True, torch.float16, (6,)),
]


@pytest.mark.parametrize(("kind", "channels_last", "dtype", "ns"), CASES)
def check_matches_reference(
    kind: str, channels_last: bool, dtype: torch.dtype, ns: tuple[int, ...]
) -> None:
    _require_triton_path()
    param_dtype = torch.float32
    for momentum in (0.1, None):
        bn = make_bn(kind, dtype=param_dtype, momentum=momentum)
        model = nn.Sequential(bn, nn.ReLU(inplace=True))
        run_side_by_side(
            model,
            4,
            [input_shape(kind, n) for n in ns],
            [input_shape(kind, 3)],
            dtype=dtype,
            channels_last=channels_last,
            backend="triton",
        )


def check_affine_false() -> None:
    _require_triton_path()
    model = nn.Sequential(make_bn("2d", dtype=torch.float32, affine=False))
    run_side_by_side(model, 3, [input_shape("2d", 9)], dtype=torch.float32, backend="triton")


@pytest.mark.parametrize(
    ("kind", "channels_last", "dtype"),
    [("2d", True, torch.bfloat16), ("1d_NC", False, torch.float32)],
)
def check_compiled_kernels_match_reference(
    kind: str, channels_last: bool, dtype: torch.dtype
) -> None:
    """backend="triton": torch.compile gets the Triton kernels as custom ops (forward and
    backward), and the result still matches the reference, tails included."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    _require_triton_path()
    torch._dynamo.reset()
    model = nn.Sequential(make_bn(kind, dtype=torch.float32), nn.ReLU())
    backend = AotEagerAndRecordGraphs()
    gm = fxghost.transform(model.to(DEVICE), 4, backend="triton")
    compiled = torch.compile(gm, fullgraph=True, backend=backend)
    run_side_by_side(
        model,
        4,
        [input_shape(kind, 12), input_shape(kind, 9)],
        dtype=dtype,
        channels_last=channels_last,
        transformed=compiled,
    )
    forward = "\n".join(g.code for g in backend.fw_graphs)
    backward = "\n".join(g.code for g in backend.bw_graphs)
    assert "fxghost.triton_ghost_norm.default" in forward
    assert "fxghost.triton_ghost_norm_backward.default" in backward
    torch._dynamo.reset()


def check_triton_custom_ops_opcheck() -> None:
    """Schemas, fake implementations and autograd registration of the Triton custom ops."""
    _require_triton_path()
    xg = (
        torch.randn(6, 4, 5, 3, device=DEVICE)
        .contiguous(memory_format=torch.channels_last)
        .view(2, 3, 4, 5, 3)
    )
    w = torch.rand(4, device=DEVICE) + 0.5
    b = torch.randn(4, device=DEVICE)
    torch.library.opcheck(torch.ops.fxghost.triton_ghost_norm.default, (xg, w, b, 1e-5))
    y, mean, var, rstd = torch.ops.fxghost.triton_ghost_norm(xg, w, b, 1e-5)
    dy = torch.randn(xg.shape, device=DEVICE)
    torch.library.opcheck(
        torch.ops.fxghost.triton_ghost_norm_backward.default, (dy, xg, w, mean, rstd)
    )
