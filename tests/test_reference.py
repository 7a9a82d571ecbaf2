"""The chunked reference (fxghost's specification) against code that shares nothing with fxghost.

``fxghost.reference`` imports fxghost's planning and selection logic, so comparing fxghost with it
cannot catch a mistake in that shared code. Here its results are checked against a loop written
from the documented semantics (docs/semantics.md) with ``torch.nn.functional.batch_norm`` alone,
and its cumulative average (``momentum=None``) against numbers worked out by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import init_bn
from torch import nn

from fxghost.reference import ChunkedGhostBatchNorm, apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

# (BatchNorm class, one sample's shape)
KINDS = {
    "1d_NC": (nn.BatchNorm1d, (3,)),
    "1d_NCL": (nn.BatchNorm1d, (3, 4)),
    "2d": (nn.BatchNorm2d, (3, 2, 3)),
    "3d": (nn.BatchNorm3d, (2, 2, 1, 3)),
}

# (training batch sizes, g): even; uneven (10 -> 4, 4, 2; 8 -> 3, 3, 2; 11 -> 3, 3, 3, 2);
# N = g; g = 1; a short last chunk (9 -> 5, 4); a one-sample last chunk (7 -> 3, 3, 1), which
# BatchNorm refuses on (N, C) inputs (one value per channel) and accepts with spatial dims.
BATCHES = [((12, 8), 4), ((10, 8), 4), ((8, 11), 3), ((4, 5), 4), ((6,), 1), ((9,), 5), ((7,), 3)]


def expected_step(
    x: torch.Tensor, state: dict[str, torch.Tensor | None], bn: nn.Module, g: int, training: bool
) -> torch.Tensor:
    """One forward of ghost BatchNorm as docs/semantics.md states it, on the tensors in ``state``
    (weight, bias, running_mean, running_var, num_batches_tracked), which it updates."""
    mean, var, count = state["running_mean"], state["running_var"], state["num_batches_tracked"]
    if not training and mean is not None:
        # Eval with running statistics: plain BatchNorm eval, whole batch.
        return F.batch_norm(x, mean, var, state["weight"], state["bias"], False, 0.0, bn.eps)
    requested = math.ceil(x.shape[0] / g)
    outputs = []
    for chunk in x.chunk(requested):
        if training and mean is not None:
            assert count is not None
            count += 1
            momentum = 1.0 / float(count) if bn.momentum is None else bn.momentum / requested
        else:
            momentum = 0.0  # no running statistics to update
        outputs.append(
            F.batch_norm(
                chunk,
                mean if training else None,
                var if training else None,
                state["weight"],
                state["bias"],
                True,
                momentum,
                bn.eps,
            )
        )
    return torch.cat(outputs)


def _state(bn: nn.Module) -> dict[str, torch.Tensor | None]:
    """Independent copies of ``bn``'s tensors, parameters requiring grad like the layer's."""
    state: dict[str, torch.Tensor | None] = {}
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        t = getattr(bn, name)
        state[name] = None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
    return state


def _build(kind: str, momentum: float | None, affine: bool, track: bool) -> nn.Module:
    cls, sample = KINDS[kind]
    bn = cls(sample[0], momentum=momentum, affine=affine, track_running_stats=track)
    return init_bn(bn, torch.float64)


def _close(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    assert (got is None) == (want is None), what
    if got is None or want is None:
        return
    if want.dtype == torch.long:
        assert torch.equal(got, want), f"{what}: {got} != {want}"
    else:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("ns", "g"), BATCHES)
@pytest.mark.parametrize("momentum", [0.1, 0.6, None])
@pytest.mark.parametrize(
    ("affine", "track"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_reference_matches_a_per_chunk_loop(
    kind: str, ns: tuple[int, ...], g: int, momentum: float | None, affine: bool, track: bool
) -> None:
    """Training steps, then eval batches smaller and larger than g: output, input and parameter
    gradients, running statistics and num_batches_tracked after every step; a step the loop
    refuses (a chunk with a single value per channel), the reference refuses too."""
    torch.manual_seed(0)
    bn = _build(kind, momentum, affine, track)
    wrapped = ChunkedGhostBatchNorm(bn, g)
    state = _state(bn)
    sample = KINDS[kind][1]
    steps = [(n, True) for n in ns] + [(max(1, g - 1), False), (g + 3, False)]
    for i, (n, training) in enumerate(steps):
        wrapped.train(training)
        x = (torch.randn(n, *sample, dtype=torch.float64) * 2 + 0.5).requires_grad_()
        x_loop = x.detach().clone().requires_grad_()
        what = f"step {i} (N={n}, {'train' if training else 'eval'})"
        try:
            y_loop = expected_step(x_loop, state, bn, g, training)
        except ValueError:
            with pytest.raises(ValueError):
                wrapped(x)
            return
        y = wrapped(x)
        _close(y, y_loop, f"{what}: output")
        dy = torch.randn_like(y)
        y.backward(dy)
        y_loop.backward(dy)
        _close(x.grad, x_loop.grad, f"{what}: input grad")
        for name in ("weight", "bias"):
            param, mine = getattr(bn, name), state[name]
            _close(
                None if param is None else param.grad,
                None if mine is None else mine.grad,
                f"{what}: grad of {name}",
            )
            if param is not None:
                param.grad = None
                mine.grad = None  # type: ignore[union-attr]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _close(getattr(bn, name), state[name], f"{what}: {name}")


def test_momentum_is_divided_by_the_number_of_ghost_batches() -> None:
    """N=12, g=4, momentum 0.3: three chunks each updating with momentum 0.1. With BatchNorm1d
    on (N, 1) inputs of constant chunks the chunk means are the chunk values, so the running
    mean is a hand-computable EMA: 0 -> 0.9*0 + 0.1*1 = 0.1 -> 0.9*0.1 + 0.1*2 = 0.29
    -> 0.9*0.29 + 0.1*4 = 0.661."""
    bn = nn.BatchNorm1d(1, momentum=0.3, affine=False).double()
    bn.running_mean.zero_()
    x = torch.tensor(
        [[1.0], [1.0], [1.0], [1.0], [2.0], [2.0], [2.0], [2.0], [4.0], [4.0], [4.0], [4.0]],
        dtype=torch.float64,
    )
    ChunkedGhostBatchNorm(bn, 4).train()(x)
    assert float(bn.running_mean) == pytest.approx(0.661, abs=1e-12)
    # Every chunk is constant: unbiased variance 0, so running_var decays from 1 by 0.9 a chunk.
    assert float(bn.running_var) == pytest.approx(0.9**3, abs=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_cumulative_average_by_hand() -> None:
    """momentum=None: BatchNorm's cumulative average, applied once per chunk.

    Batch 1, N=4, g=2: chunks [1, 3] and [2, 6].
      chunk 1: mean 2, biased var 1, unbiased var 2; count 1 -> mean 2, var 2
      chunk 2: mean 4, biased var 4, unbiased var 8; count 2 -> mean 2 + (4 - 2)/2 = 3,
               var 2 + (8 - 2)/2 = 5
    Batch 2, N=6, g=2: chunks [0, 2], [10, 14], [5, 5].
      chunk 3: mean 1, unbiased var 2;  count 3 -> mean 3 + (1 - 3)/3 = 7/3,  var 5 + (2 - 5)/3 = 4
      chunk 4: mean 12, unbiased var 8; count 4 -> mean 7/3 + (12 - 7/3)/4 = 19/4,
               var 4 + (8 - 4)/4 = 5
      chunk 5: mean 5, unbiased var 0;  count 5 -> mean 19/4 + (5 - 19/4)/5 = 24/5,
               var 5 + (0 - 5)/5 = 4
    That is the plain average of the five chunks' statistics: (2+4+1+12+5)/5 and
    (2+8+2+8+0)/5; the initial running statistics, 0 and 1, have weight 0 from the first update.
    Outputs: each chunk normalized by its own mean and biased variance.
    """
    eps = 1e-5
    bn = nn.BatchNorm1d(1, momentum=None, affine=False, eps=eps).double()
    ghost = ChunkedGhostBatchNorm(bn, 2).train()
    col = lambda *v: torch.tensor(v, dtype=torch.float64).view(-1, 1)  # noqa: E731

    y = ghost(col(1, 3, 2, 6))
    torch.testing.assert_close(
        y,
        col(
            -1 / math.sqrt(1 + eps),
            1 / math.sqrt(1 + eps),
            -2 / math.sqrt(4 + eps),
            2 / math.sqrt(4 + eps),
        ),
        rtol=0,
        atol=1e-12,
    )
    assert (float(bn.running_mean), float(bn.running_var), int(bn.num_batches_tracked)) == (
        pytest.approx(3.0, abs=1e-12),
        pytest.approx(5.0, abs=1e-12),
        2,
    )

    y = ghost(col(0, 2, 10, 14, 5, 5))
    torch.testing.assert_close(
        y,
        col(
            -1 / math.sqrt(1 + eps),
            1 / math.sqrt(1 + eps),
            -2 / math.sqrt(4 + eps),
            2 / math.sqrt(4 + eps),
            0,
            0,
        ),
        rtol=0,
        atol=1e-12,
    )
    assert float(bn.running_mean) == pytest.approx(24 / 5, abs=1e-12)
    assert float(bn.running_var) == pytest.approx(4.0, abs=1e-12)
    assert int(bn.num_batches_tracked) == 5


def test_apply_wraps_every_batchnorm_and_only_those() -> None:
    """The module surgery: each exact BatchNorm is wrapped (parameters and buffers kept, state
    keys one level deeper), other layers and BatchNorm subclasses are left alone, and the model
    computes with the wrappers."""

    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        MyBN(4),
        nn.Flatten(),
        nn.Linear(4, 2),
        nn.BatchNorm1d(2),
    )
    params = {id(p) for p in model.parameters()}
    keys = list(model.state_dict())
    wrapped = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 2)
    assert [type(m).__name__ for m in wrapped] == [
        "Conv2d",
        "ChunkedGhostBatchNorm",
        "MyBN",
        "Flatten",
        "Linear",
        "ChunkedGhostBatchNorm",
    ]
    deeper = [f"{k[:2]}bn.{k[2:]}" if k[0] in "15" else k for k in keys]
    assert list(wrapped.state_dict()) == deeper
    same = apply_chunked_ghost_batchnorm(model, 2)
    assert same is model and {id(p) for p in model.parameters()} == params
    x = torch.randn(4, 3, 1, 1)
    assert model.train()(x).shape == (4, 2)
    assert int(model[1].bn.num_batches_tracked) == 2
    # A bare BatchNorm comes back wrapped.
    assert isinstance(apply_chunked_ghost_batchnorm(nn.BatchNorm1d(3), 2), ChunkedGhostBatchNorm)
