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


class _Block(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv -> BatchNorm, += a shortcut, ReLU: both epilogues."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.shortcut(x)
        return self.relu(out)


@pytest.mark.parametrize(
    ("dtype", "channels_last"), [(torch.float32, False), (torch.bfloat16, True)]
)
def check_fused_epilogues_are_the_unfused_graph(dtype: torch.dtype, channels_last: bool) -> None:
    """Through the pass: a residual block with the ReLU and add-ReLU epilogues fused into the
    Triton kernels gives the unfused graph's outputs, gradients and running statistics bit for
    bit, whole ghost batches and a shorter last one, and in eval."""
    import copy

    _require_triton_path()
    torch.manual_seed(0)
    model = _Block(3, 4).to(DEVICE, dtype)
    twin = copy.deepcopy(model)
    fused = fxghost.transform(model, 4, backend="triton")
    unfused = fxghost.transform(twin, 4, backend="triton", fuse_epilogues=False)
    epilogues = [n.kwargs.get("epilogue") for n in fused.graph.nodes if n.kwargs.get("epilogue")]
    assert sorted(epilogues) == ["add_relu", "relu"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for n, training in ((8, True), (10, True), (6, False)):
        x = torch.randn(n, 3, 5, 5).to(dtype).contiguous(memory_format=fmt)
        dy = torch.randn(n, 4, 5, 5).to(dtype)
        outputs = []
        for gm in (fused, unfused):
            gm.train(training)
            xi = x.clone().requires_grad_(training)
            y = gm(xi)
            if training:
                y.backward(dy)
            outputs.append((y.detach(), xi.grad))
        (y1, g1), (y2, g2) = outputs
        assert torch.equal(y1, y2), n
        assert (g1 is None and g2 is None) or torch.equal(g1, g2), n
        for (name, a), b in zip(
            model.state_dict().items(), twin.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"N={n}: {name}"
        for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), name
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
