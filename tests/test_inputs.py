"""Input dtypes: a transformed model refuses exactly what plain BatchNorm refuses, in training and
in eval, before any running statistic changes; what plain BatchNorm accepts still matches the
reference."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import input_shape, make_bn, run_side_by_side
from torch import nn

import fxghost
from fxghost._plan import InputDtypeError, dtype_problem
from fxghost.reference import ChunkedGhostBatchNorm

pytestmark = pytest.mark.usefixtures("one_thread")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NOT_FLOATS = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)
_KINDS = ("1d_NC", "1d_NCL", "2d", "3d")
_CONFIGS = {
    "affine+stats": dict(affine=True, track_running_stats=True),
    "stats": dict(affine=False, track_running_stats=True),
    "affine": dict(affine=True, track_running_stats=False),
    "bare": dict(affine=False, track_running_stats=False),
}


def _plain_accepts(layer_dtype: torch.dtype, input_dtype: torch.dtype, config: str) -> bool:
    # What plain BatchNorm does on CPU (the tests below check it against plain BatchNorm): a
    # floating input; without parameters and running statistics any, otherwise their dtype, or
    # float16/bfloat16 with float32 ones (mixed precision).
    if input_dtype not in _FLOATS:
        return False
    mixed = input_dtype in (torch.float16, torch.bfloat16) and layer_dtype == torch.float32
    return config == "bare" or input_dtype == layer_dtype or mixed


def _cases(
    layer_dtypes: tuple[torch.dtype, ...], input_dtypes: tuple[torch.dtype, ...], accepted: bool
) -> list[Any]:
    return [
        pytest.param(
            layer_dtype,
            input_dtype,
            _CONFIGS[config],
            id=f"{str(input_dtype)[6:]}_into_{str(layer_dtype)[6:]}_{config}",
        )
        for layer_dtype, input_dtype, config in itertools.product(
            layer_dtypes, input_dtypes, _CONFIGS
        )
        if _plain_accepts(layer_dtype, input_dtype, config) == accepted
    ]


REFUSED = [
    *_cases((torch.float32, torch.bfloat16), _NOT_FLOATS, accepted=False),
    *_cases(_FLOATS, _FLOATS, accepted=False),
]
ACCEPTED = [
    *_cases((torch.float32,), _FLOATS, accepted=True),
    *[
        p
        for p in _cases((torch.float64, torch.bfloat16, torch.float16), _FLOATS, accepted=True)
        if "bare" in p.id or "affine+stats" in p.id
    ],
]


def _batch(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.randint(0, 5, shape).to(dtype)
    return (torch.randn(shape) * 2 + 0.5).to(dtype)


def _state(bn: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bn.state_dict().items()}


def _assert_unchanged(bn: nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), f"{what}: {key} changed"


def test_input_dtype_error_is_a_type_error_and_a_runtime_error() -> None:
    assert issubclass(InputDtypeError, TypeError)
    assert issubclass(InputDtypeError, RuntimeError)


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize(("layer_dtype", "input_dtype", "config"), REFUSED)
def test_refused_like_plain_batchnorm_and_nothing_changes(
    layer_dtype: torch.dtype, input_dtype: torch.dtype, config: dict[str, bool], kind: str
) -> None:
    bn = make_bn(kind, dtype=layer_dtype, **config)
    plain = copy.deepcopy(bn)
    gm = fxghost.transform(nn.Sequential(bn), ghost_batch_size=4)
    x = _batch(input_dtype, input_shape(kind, 8))
    for training in (True, False):
        what = "train" if training else "eval"
        plain.train(training)
        gm.train(training)
        with pytest.raises(RuntimeError):
            plain(x)
        before = _state(bn)
        with pytest.raises(RuntimeError) as info:
            gm(x)
        _assert_unchanged(bn, before, what)
        if training or not bn.track_running_stats:
            # fxghost's own check (eval with running statistics is F.batch_norm's).
            assert info.type is InputDtypeError, (what, info.value)
            message = str(info.value)
            assert "layer '0'" in message and type(bn).__name__ in message, message
            assert str(input_dtype) in message and ("x." in message or "to(" in message), message


@pytest.mark.parametrize(("layer_dtype", "input_dtype", "config"), REFUSED)
def test_reference_refuses_the_same_way(
    layer_dtype: torch.dtype, input_dtype: torch.dtype, config: dict[str, bool]
) -> None:
    bn = make_bn("2d", dtype=layer_dtype, **config)
    reference = ChunkedGhostBatchNorm(copy.deepcopy(bn), 4, name="0")
    gm = fxghost.transform(nn.Sequential(bn), ghost_batch_size=4)
    x = _batch(input_dtype, input_shape("2d", 8))
    before = _state(reference.bn)
    with pytest.raises(InputDtypeError) as from_reference:
        reference(x)
    _assert_unchanged(reference.bn, before, "reference")
    with pytest.raises(InputDtypeError) as from_gm:
        gm(x)
    assert str(from_reference.value) == str(from_gm.value)


def test_messages_name_the_layer_the_dtypes_and_the_fix() -> None:
    model = nn.Sequential(nn.Linear(3, 3).double(), nn.BatchNorm1d(3))
    with pytest.raises(
        InputDtypeError,
        match=r"layer '1' \(BatchNorm1d\) got a torch\.float64 "
        r"input but its parameters and running statistics are torch\.float32.*"
        r"x\.to\(torch\.float32\).*model\.to\(torch\.float64\)",
    ):
        fxghost.transform(model, 4)(torch.randn(8, 3, dtype=torch.float64))
    bn = nn.BatchNorm1d(3)
    bn.running_mean = bn.running_mean.half()
    with pytest.raises(
        InputDtypeError,
        match=r"running_mean torch\.float16.*one dtype.*"
        r"layer\.to\(torch\.float32\)",
    ):
        fxghost.transform(nn.Sequential(bn), 4)(torch.randn(8, 3))
    with pytest.raises(
        InputDtypeError,
        match=r"torch\.int64 input.*float16, bfloat16, float32 "
        r"and float64.*x\.float\(\)",
    ):
        fxghost.transform(nn.Sequential(nn.BatchNorm1d(3)), 4)(torch.arange(24).view(8, 3))


@pytest.mark.parametrize("kind", ["1d_NC", "2d", "3d"])
@pytest.mark.parametrize(("layer_dtype", "input_dtype", "config"), ACCEPTED)
def test_accepted_inputs_match_the_reference(
    layer_dtype: torch.dtype, input_dtype: torch.dtype, config: dict[str, bool], kind: str
) -> None:
    bn = make_bn(kind, dtype=layer_dtype, **config)
    eval_shapes = [input_shape(kind, 3)] if bn.track_running_stats else []
    run_side_by_side(
        nn.Sequential(bn),
        4,
        [input_shape(kind, 16), input_shape(kind, 10)],
        eval_shapes,
        dtype=input_dtype,
    )


def _accepts(x: torch.Tensor, state: list[torch.Tensor | None], training: bool) -> bool:
    weight, bias, mean, var = state
    try:
        F.batch_norm(x, mean, var, weight, bias, training, 0.1, 1e-5)
    except RuntimeError:  # NotImplementedError for non-floating inputs is one too
        return False
    return True


_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", _DEVICES)
def test_dtype_rule_is_batch_norms(device: str) -> None:
    # Every combination of input, weight, bias and running-statistic dtypes (each tensor present
    # or not): fxghost's rule refuses exactly what F.batch_norm refuses, in training and in eval.
    options = (None, *_FLOATS)
    disagreements = []
    for x_dtype, w, b, m, v in itertools.product((*_FLOATS, *_NOT_FLOATS), *[options] * 4):
        if (m is None) != (v is None):
            continue  # BatchNorm holds both running statistics or neither
        x = _batch(x_dtype, (4, 3)).to(device)
        state = [
            None if d is None else torch.rand(3, device=device).to(d) + 0.5 for d in (w, b, m, v)
        ]
        ours = dtype_problem((x_dtype, w, b, m, v)) is None
        for training in (True, False) if m is not None else (True,):
            theirs = _accepts(x, [s if s is None else s.clone() for s in state], training)
            if ours != theirs:
                disagreements.append((x_dtype, w, b, m, v, training, theirs))
    assert not disagreements, disagreements[:10]
