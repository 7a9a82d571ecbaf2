"""Property tests: fxghost against the chunked reference over drawn shapes, batch sizes, ghost
sizes, momenta, flags, dtypes and layouts; errors, NaN/Inf, and the caller's model left alone.

Hypothesis runs derandomized (a fixed sequence of examples), so CI is deterministic.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import ConstantNet, assert_same_state, init_bn, run_side_by_side
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxghost
from fxghost.reference import apply_chunked_ghost_batchnorm

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

BN_CLASSES = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Layer:
    """A drawn BatchNorm configuration."""

    cls: type[nn.Module]
    channels: int
    spatial: tuple[int, ...]  # () for BatchNorm1d on (N, C)
    momentum: float | None
    affine: bool
    track: bool
    dtype: torch.dtype
    channels_last: bool

    def shape(self, n: int) -> tuple[int, ...]:
        return (n, self.channels, *self.spatial)

    def build(self) -> nn.Module:
        bn = self.cls(
            self.channels,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track,
        )
        return init_bn(bn, self.dtype)


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    kind = draw(st.sampled_from(["1d_NC", "1d_NCL", "2d", "3d"]))
    spatial: tuple[int, ...] = {
        "1d_NC": (),
        "1d_NCL": (draw(st.integers(1, 4)),),
        "2d": tuple(draw(st.lists(st.integers(1, 3), min_size=2, max_size=2))),
        "3d": tuple(draw(st.lists(st.integers(1, 2), min_size=3, max_size=3))),
    }[kind]
    cls = nn.BatchNorm1d if kind.startswith("1d") else BN_CLASSES[len(spatial)]
    # momentum in [0, 1], the edges included, or None (cumulative average).
    momentum = draw(
        st.one_of(st.none(), st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, allow_nan=False))
    )
    return Layer(
        cls=cls,
        channels=draw(st.integers(1, 4)),
        spatial=spatial,
        momentum=momentum,
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        channels_last=len(spatial) >= 2 and draw(st.booleans()),
    )


def expected_error(layer: Layer, n: int, g: int, training: bool) -> str | None:
    """An independent statement of the error rules: which error a step must raise, if any."""
    uses_batch_stats = training or not layer.track
    if not uses_batch_stats:
        return None  # plain BatchNorm eval: any N
    if training and n < g:
        return "smaller than ghost_batch_size"
    if n == 0:
        return None
    per_sample = math.prod(layer.spatial)
    sizes = [len(c) for c in torch.arange(n).chunk(-(-n // g))]
    if min(sizes) * per_sample == 1:
        return "single value per channel"
    return None


def one_sample_tail(n: int, g: int) -> bool:
    """Whether the last ghost batch holds a single sample (see the channels_last test)."""
    sizes = [len(c) for c in torch.arange(n).chunk(-(-n // g))] if n >= 1 else []
    return len(sizes) > 1 and sizes[-1] == 1


def _call(module: nn.Module, x: torch.Tensor) -> BaseException | None:
    try:
        module(x)
    except ValueError as err:
        return err
    return None


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} changed"


@st.composite
def runs(draw: st.DrawFn) -> tuple[Layer, int, list[int], int]:
    """A layer, a ghost size, one or two training batch sizes and an eval batch size. Half the
    batch sizes are drawn at least g, so that error-free runs are not rare."""
    layer = draw(layers())
    g = draw(st.integers(1, 6))
    batch = st.one_of(st.integers(g, 3 * g + 2), st.integers(1, 14))
    train_ns = draw(st.lists(batch, min_size=1, max_size=2))
    return layer, g, train_ns, draw(st.integers(1, 7))


@SETTINGS
@given(run=runs())
def test_matches_reference(run: tuple[Layer, int, list[int], int]) -> None:
    """Training steps then an eval step: outputs, input and parameter gradients, running
    statistics and num_batches_tracked as the chunked reference; or the same ValueError from
    both, with nothing updated."""
    layer, g, train_ns, eval_n = run
    steps = [(n, True) for n in train_ns] + [(eval_n, False)]
    failing = next(
        (i for i, (n, t) in enumerate(steps) if expected_error(layer, n, g, t) is not None), None
    )
    ok_steps = steps if failing is None else steps[:failing]
    # Shown by --hypothesis-show-statistics: how often each branch is exercised.
    if failing is None:
        event("no error")
    else:
        event(f"error: {expected_error(layer, steps[failing][0], g, steps[failing][1])}")
    event(f"{layer.cls.__name__}, {layer.dtype}, channels_last={layer.channels_last}")
    model = nn.Sequential(layer.build())
    gm = run_side_by_side(
        model,
        g,
        [layer.shape(n) for n, t in ok_steps if t],
        [layer.shape(n) for n, t in ok_steps if not t],
        dtype=layer.dtype,
        channels_last=layer.channels_last,
    )
    if failing is None:
        return
    # The failing step, from the state the steps before it left (shared by model and gm).
    n, training = steps[failing]
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), g)
    gm.train(training)
    reference.train(training)
    x = torch.randn(layer.shape(n), dtype=torch.float64).to(layer.dtype)
    before = _state(model)
    err_gm = _call(gm, x.clone())
    err_ref = _call(reference, x.clone())
    want = expected_error(layer, n, g, training)
    assert err_ref is not None and want in str(err_ref), (want, err_ref)
    assert err_gm is not None, f"fxghost did not raise; the reference raised: {err_ref}"
    assert str(err_gm) == str(err_ref)
    # Nothing is updated before the check: running statistics and num_batches_tracked.
    _assert_same_tensors(_state(model), before, "fxghost after the error")
    _assert_same_tensors(
        {k.replace(".bn.", "."): v for k, v in _state(reference).items()},
        before,
        "reference after the error",
    )


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    layer=layers(),
    g=st.integers(2, 4),
    n=st.integers(4, 12),
    bad=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from([math.nan, math.inf, -math.inf])),
        min_size=1,
        max_size=3,
    ),
)
def test_nan_and_inf_propagate_as_in_the_reference(
    layer: Layer, g: int, n: int, bad: list[tuple[int, float]]
) -> None:
    """NaN/Inf in the input: the same NaN and Inf positions in the output, the input gradient
    and the running statistics as the reference (one ghost batch's NaN must not leak into the
    others' outputs)."""
    if expected_error(layer, n, g, True) is not None:
        event("skipped: error case")
        return
    event(f"momentum={layer.momentum if layer.momentum in (None, 0.0, 1.0) else 'other'}")
    model = nn.Sequential(layer.build())
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), g)
    gm = fxghost.transform(model, g)
    x = torch.randn(layer.shape(n), dtype=torch.float64)
    flat = x.view(-1)
    for pos, value in bad:
        flat[pos % flat.numel()] = value
    if layer.channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    x = x.to(layer.dtype)
    x_gm = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    y_gm, y_ref = gm(x_gm), reference(x_ref)
    _assert_same_special(y_gm, y_ref, "output")
    dy = torch.randn(y_ref.shape, dtype=torch.float64).to(layer.dtype)
    y_gm.backward(dy)
    y_ref.backward(dy)
    _assert_same_special(x_gm.grad, x_ref.grad, "input grad")
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        _assert_same_special(a, b, f"buffer {name}")
    for (name, a), (_, b) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        _assert_same_special(a.grad, b.grad, f"grad of {name}")


def _assert_same_special(a: torch.Tensor | None, b: torch.Tensor | None, what: str) -> None:
    """Same NaN, +Inf and -Inf positions; the finite values close."""
    if b is None:
        assert a is None, what
        return
    assert a is not None, what
    if not b.is_floating_point():
        assert torch.equal(a, b), what
        return
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(a == math.inf, b == math.inf), f"{what}: +Inf positions differ"
    assert torch.equal(a == -math.inf, b == -math.inf), f"{what}: -Inf positions differ"
    finite = b.isfinite()
    rtol, atol = (1e-9, 1e-10) if b.dtype == torch.float64 else (2e-4, 2e-5)
    torch.testing.assert_close(a[finite], b[finite], rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize(
    ("shape", "fmt"),
    [((3, 4, 5, 3), torch.channels_last), ((5, 2, 2, 3, 2), torch.channels_last_3d)],
    ids=["2d", "3d"],
)
def test_channels_last_with_a_one_sample_ghost_batch(
    shape: tuple[int, ...], fmt: torch.memory_format
) -> None:
    """A one-sample last ghost batch (N=3 or 5, g=2) keeps channels_last, as the reference does
    (it once came out NCHW-contiguous: a (1, C, ...) tensor's layout is ambiguous)."""
    assert one_sample_tail(shape[0], 2)
    model = nn.Sequential(BN_CLASSES[len(shape) - 2](shape[1])).double()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 2)
    gm = fxghost.transform(model, 2)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
    y_ref = reference(x)
    assert y_ref.is_contiguous(memory_format=fmt)
    y = gm(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
    assert y.is_contiguous(memory_format=fmt), f"strides {y.stride()}"


def test_layer_that_raises_leaves_its_statistics_but_earlier_layers_ran() -> None:
    """N=5, g=2: ghost batches of 2, 2 and 1 samples. The BatchNorm2d on 2x2 maps sees 4 values
    in the last one and runs; the BatchNorm1d after pooling sees 1 and raises. Both
    implementations then hold the first layer's update and the second layer's old statistics."""
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(3)
    ).double()
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 2)
    gm = fxghost.transform(model, 2)
    second = _state(model[3])
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="layer '3'.*single value per channel") as err_gm:
        gm(x)
    with pytest.raises(ValueError) as err_ref:
        reference(x)
    assert str(err_gm.value) == str(err_ref.value)
    _assert_same_tensors(_state(model[3]), second, "the layer that raised")
    assert int(model[0].num_batches_tracked) == 3, "the first layer ran its three ghost batches"
    assert_same_state(model, reference, "after the error")


# ---------------------------------------------------------------------------------------------
# The caller's model is never modified, whether transform succeeds or fails.


class Untraceable(nn.Module):
    """Python control flow on a tensor value in the root forward: does not trace as a whole."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        if y.sum() > 0:  # data-dependent branch
            y = self.bn(y)
        return y


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a transform could change: modules and their types, attributes, flags,
    registries, parameter and buffer identities and values."""
    return {
        "modules": [(name, type(m), id(m), m.training) for name, m in model.named_modules()],
        "attributes": {name: sorted(vars(m)) for name, m in model.named_modules()},
        "children": {name: list(m._modules) for name, m in model.named_modules()},
        "params": [(name, id(p), p.detach().clone()) for name, p in model.named_parameters()],
        "buffers": [(name, id(b), b.clone()) for name, b in model.named_buffers()],
        "state_keys": list(model.state_dict()),
        "momenta": [getattr(m, "momentum", None) for m in model.modules()],
    }


def _assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = _snapshot(model)
    for key in ("modules", "attributes", "children", "state_keys", "momenta"):
        assert after[key] == before[key], f"{key} changed"
    for key in ("params", "buffers"):
        assert [(n, i) for n, i, _ in after[key]] == [(n, i) for n, i, _ in before[key]], key
        for (n, _, a), (_, _, b) in zip(after[key], before[key], strict=True):
            assert torch.equal(a, b), f"{key}: {n} changed"


def _untraceable_strict(model: nn.Module) -> None:
    with pytest.raises(fxghost.TracingError):
        fxghost.transform(model, 2, strict=True)


def _untraceable_partial(model: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PartialRewriteWarning: expected here
        partial = fxghost.transform(model, 2)
    partial.train()(torch.randn(4, 3, 5, 5))  # and using the result does not modify it either


def _unmatched_only(model: nn.Module) -> None:
    with pytest.raises(ValueError):
        fxghost.transform(model, 2, only=["no_such_layer"])


def _bad_ghost_size(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="ghost_batch_size"):
        fxghost.transform(model, 0)


@pytest.mark.parametrize(
    "attempt",
    [_untraceable_strict, _untraceable_partial, _unmatched_only, _bad_ghost_size],
    ids=["untraceable-strict", "untraceable-partial", "unmatched-only", "bad-ghost-size"],
)
def test_transform_does_not_modify_the_model(attempt: Any) -> None:
    model = Untraceable()
    model.eval()  # a flag the transform must not flip
    model.features[1].train()  # nor a per-layer one
    model.bn.momentum = 0.3
    before = _snapshot(model)
    attempt(model)
    if attempt is not _untraceable_partial:  # running the partial result updates shared stats
        _assert_unchanged(before, model)
    else:
        after = _snapshot(model)
        # A layer that ran records which implementation ran it, for the report (docs/ghosted.md,
        # "What is kept"): that attribute and nothing else.
        ran = {
            name: [a for a in attrs if a != fxghost.backends.LAST_RUN_ATTR]
            for name, attrs in after["attributes"].items()
        }
        assert ran == before["attributes"]
        assert fxghost.backends.LAST_RUN_ATTR in vars(model.features[1])
        for key in ("modules", "children", "state_keys", "momenta"):
            if key == "modules":  # gm.train() sets the shared layers' flags, as documented
                assert [x[:3] for x in after[key]] == [x[:3] for x in before[key]]
            else:
                assert after[key] == before[key], f"{key} changed"


def test_successful_transform_does_not_modify_the_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(36))
    model.eval()
    before = _snapshot(model)
    gm = fxghost.transform(model, 2)
    _assert_unchanged(before, model)
    assert isinstance(gm, torch.fx.GraphModule)


def test_transform_does_not_add_attributes_to_the_model() -> None:
    """torch.fx's tracer stores tensors created in forward on the traced root
    (``_tensor_constantN``): that must not be the caller's model."""
    model = ConstantNet()
    before = _snapshot(model)
    fxghost.transform(model, 2)
    _assert_unchanged(before, model)
