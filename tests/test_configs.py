"""Every BatchNorm configuration PyTorch accepts, against plain BatchNorm and the chunked
reference: PyTorch's own BatchNorm ModuleInfo inputs (which need the expecttest package), layers
without their weight or their bias, training batches of no samples or of samples without values,
and the running statistics of a BatchNorm that ends an activation-checkpointed block."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from bn_layers import MISSING, partial_bn
from conftest import (
    BN_SHAPES,
    assert_close,
    assert_same_state,
    init_bn,
    input_shape,
    run_side_by_side,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import fxghost
from fxghost.backends import cpu
from fxghost.reference import ChunkedGhostBatchNorm, apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

needs_kernels = pytest.mark.skipif(
    not cpu.available(), reason="no C compiler: the CPU kernels are not built here"
)
BACKENDS = ["torch", pytest.param("cpu", marks=needs_kernels), "auto"]


def _quietly(model: nn.Module, g: int, **kwargs: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxghost.PartialRewriteWarning)
        return fxghost.transform(model, g, **kwargs)


# ---------------------------------------------------------------------------------------------
# PyTorch's BatchNorm ModuleInfo inputs (torch.testing._internal.common_modules.module_db).


def _module_infos() -> list[Any]:
    """``[(module_info, training, index of its input)]``, or one skipped entry saying why there
    are none."""
    try:
        # common_utils, which module_db's module imports, needs the expecttest package.
        from torch.testing._internal.common_modules import module_db
    except ImportError as err:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no module_db here: {err}"))]
    classes = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    lazy = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
    cases = []
    for info in module_db:
        if info.module_cls not in (*classes, *lazy):
            continue
        for training in (True, False):
            inputs = info.module_inputs_func(
                info, device="cpu", dtype=torch.float64, requires_grad=False, training=training
            )
            for index, module_input in enumerate(inputs):
                desc = module_input.desc or "default"
                name = f"{info.module_cls.__name__}-{desc}-{'train' if training else 'eval'}"
                marks = ()
                if info.module_cls in lazy:
                    # docs/ghosted.md, "What cannot be ghosted": run one forward pass first.
                    marks = pytest.mark.skip(reason="a lazy BatchNorm is rewritten once built")
                cases.append(pytest.param((info, training, index), id=name, marks=marks))
    return cases


def _perturbed(bn: nn.Module) -> nn.Module:
    """Parameters and running statistics away from their defaults, and some batches already
    counted (momentum=None averages over them)."""
    init_bn(bn, torch.float64)
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.fill_(3)
    return bn


def compare_module_input(
    info: Any, training: bool, index: int, backend: str, g: int, against: str
) -> None:
    """One ModuleInfo input through ``fxghost.transform(layer, g)`` and through plain
    BatchNorm (``against="plain"``) or the chunked reference (``"reference"``): outputs,
    whether they are differentiable, input and parameter gradients, running statistics and
    num_batches_tracked."""
    module_input = info.module_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=training
    )[index]
    ctor = module_input.constructor_input
    torch.manual_seed(index)
    base = _perturbed(info.module_cls(*ctor.args, **ctor.kwargs))
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    expected = theirs if against == "plain" else ChunkedGhostBatchNorm(theirs, g)
    transformed = fxghost.transform(ours, g, backend=backend)
    expected.train(training)
    transformed.train(training)
    x = module_input.forward_input.args[0]
    x_exp = x.detach().clone().requires_grad_(x.requires_grad)
    x_ours = x.detach().clone().requires_grad_(x.requires_grad)
    y_exp, y_ours = expected(x_exp), transformed(x_ours)
    what = f"g={g} against {against}"
    assert y_ours.shape == y_exp.shape and y_ours.dtype == y_exp.dtype, what
    assert y_ours.requires_grad == y_exp.requires_grad, f"{what}: differentiable output"
    assert_close(y_ours, y_exp, f"{what}: output")
    if y_exp.requires_grad:
        dy = torch.randn(y_exp.shape, dtype=y_exp.dtype, generator=torch.Generator().manual_seed(1))
        y_exp.backward(dy)
        y_ours.backward(dy)
        assert_close(x_ours.grad, x_exp.grad, f"{what}: input grad")
    for (name, p_ours), (_, p_exp) in zip(
        ours.named_parameters(), theirs.named_parameters(), strict=True
    ):
        assert_close(p_ours.grad, p_exp.grad, f"{what}: grad of {name}")
    empty_training = training and x.shape[0] == 0 and against == "plain"
    for (name, b_ours), (_, b_exp) in zip(
        ours.named_buffers(), theirs.named_buffers(), strict=True
    ):
        if name == "num_batches_tracked" and empty_training:
            # No ghost batch in an empty batch: fxghost and the reference leave the count, plain
            # BatchNorm counts the empty batch as one (docs/semantics.md).
            assert int(b_ours) == 3 and int(b_exp) == 4, f"{what}: {name}"
        elif b_exp.dtype == torch.long:
            assert torch.equal(b_ours, b_exp), f"{what}: {name}: {b_ours} != {b_exp}"
        else:
            assert_close(b_ours, b_exp, f"{what}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _module_infos())
def test_module_info_inputs(case: tuple[Any, bool, int], backend: str) -> None:
    """With g the batch size, fxghost is plain BatchNorm; with half of it (at least 1), the
    chunked reference. An empty batch (N=0, in zero_batch) takes g=1 for both: plain BatchNorm
    is then met in everything but num_batches_tracked, which fxghost leaves as it was."""
    info, training, index = case
    n = (
        info.module_inputs_func(
            info, device="cpu", dtype=torch.float64, requires_grad=False, training=training
        )[index]
        .forward_input.args[0]
        .shape[0]
    )
    compare_module_input(info, training, index, backend, max(n, 1), "plain")
    compare_module_input(info, training, index, backend, max(n // 2, 1), "reference")


# ---------------------------------------------------------------------------------------------
# Layers without their weight or their bias.


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("missing", MISSING)
@pytest.mark.parametrize("kind", list(BN_SHAPES))
def test_missing_parameter_matches_reference(kind: str, missing: str, backend: str) -> None:
    """Outputs, input and parameter gradients (none for the missing parameter), running
    statistics, over whole and uneven batches and eval; momentum=None too."""
    for momentum in (0.1, None):
        torch.manual_seed(0)
        cls, sample = BN_SHAPES[kind]
        bn = partial_bn(cls, sample[0], missing, momentum=momentum)
        model = nn.Sequential(bn)
        gm = run_side_by_side(
            model,
            4,
            [input_shape(kind, 8), input_shape(kind, 10)],
            [input_shape(kind, 3)],
            backend=backend,
        )
        params = dict(gm.named_parameters())
        assert ("0.weight" in params) == (missing == "no_bias"), list(params)
        assert ("0.bias" in params) == (missing == "no_weight"), list(params)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_missing_parameter_compiled_matches_reference(backend: str) -> None:
    """Under torch.compile (aot_eager): the composite op and the C kernels' custom op."""
    for missing in MISSING:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(partial_bn(nn.BatchNorm2d, 4, missing))
        gm = fxghost.transform(model, 4, backend=backend)
        compiled = torch.compile(gm, backend="aot_eager")
        # One uneven batch: whole ghost batches and a shorter last one, in one compilation.
        run_side_by_side(model, 4, [input_shape("2d", 10)], transformed=compiled)
    torch._dynamo.reset()


def _penalty(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor | None]:
    """A gradient penalty's gradients (second derivatives) with respect to x and the
    parameters."""
    x = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch.sin(model(x)).sum(), x, create_graph=True)
    (g**2).sum().backward()
    return [g.detach(), x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("missing", MISSING)
def test_missing_parameter_double_backward(missing: str, backend: str) -> None:
    """Second derivatives through the layer, against the reference's, over an uneven batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), partial_bn(nn.BatchNorm2d, 3, missing))
    model.double()
    x = torch.randn(10, 2, 3, 2, dtype=torch.float64)
    got = _penalty(fxghost.transform(copy.deepcopy(model), 4, backend=backend), x)
    want = _penalty(apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4), x)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a is not None and b is not None, i
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * b.abs().max().item())


# ---------------------------------------------------------------------------------------------
# A training batch of no samples.


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("missing", ["full", "no_weight"])
def test_empty_training_batch_compiled(missing: str, backend: str) -> None:
    """N=0 under torch.compile (aot_eager) as in eager: plain BatchNorm's empty output, nothing
    updated."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    if missing == "full":
        bn = init_bn(nn.BatchNorm2d(3), torch.float64)
    else:
        bn = partial_bn(nn.BatchNorm2d, 3, missing)
    plain = copy.deepcopy(bn)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    compiled = torch.compile(fxghost.transform(bn, 4, backend=backend), backend="aot_eager")
    x = torch.randn(0, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y, y_plain = compiled(x), plain(x)
    assert y.shape == x.shape and y.requires_grad
    y.sum().backward()
    y_plain.sum().backward()
    for (name, p), (_, q) in zip(bn.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name  # zeros: a sum over no samples
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(10, 3, 0), (8, 3, 0, 2)], ids=["1d_tail", "2d"])
def test_samples_without_values(
    shape: tuple[int, ...], momentum: float | None, backend: str
) -> None:
    """Samples with a dimension of size 0, which plain BatchNorm accepts: each ghost batch is an
    empty batch to the reference's BatchNorm calls, counted in num_batches_tracked, with no
    statistics to update the running ones with (not NaN)."""
    torch.manual_seed(0)
    bn = init_bn(BN_SHAPES["1d_NCL" if len(shape) == 3 else "2d"][0](3), torch.float64)
    bn.momentum = momentum
    model = nn.Sequential(bn)
    run_side_by_side(model, 4, [shape], backend=backend)
    assert int(bn.num_batches_tracked) == (3 if shape[0] == 10 else 2)  # 4, 4, 2 or 4, 4
    assert not bn.running_var.isnan().any()


# ---------------------------------------------------------------------------------------------
# Activation checkpointing with PyTorch's default early stop: the recomputation ends at the last
# tensor saved for backward, which a BatchNorm that ends the block saves.


class _Block(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))


class _CheckpointNode(nn.Module):
    """``checkpoint(self.block, x)``: traced, it stays a checkpoint node of the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False))


class _PythonCheckpoint(_CheckpointNode):
    """A checkpoint of a lambda: the module stays Python code, and its block is rewritten."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(lambda t: self.block(t), x, use_reentrant=False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("make", [_CheckpointNode, _PythonCheckpoint], ids=["node", "python"])
def test_last_batchnorm_of_a_checkpointed_block(
    make: Callable[[], nn.Module], momentum: float | None, backend: str
) -> None:
    """Running statistics and num_batches_tracked are the reference's under the same
    checkpointing: each ghost batch counted in the forward and again in the recomputation, for
    whole ghost batches and with a shorter last one."""
    torch.manual_seed(0)
    model = make().double()
    init_bn(model.block[1], torch.float64).momentum = momentum
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model), 4)
    gm = _quietly(model, 4, backend=backend)
    for i, n in enumerate((16, 18)):  # 4 ghost batches; 5, the last of 2 samples
        x = torch.randn(n, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = gm(x_ours), reference(x_ref)
        assert_close(y, y_ref, f"step {i}: output")
        r = torch.randn(y.shape, dtype=y.dtype)  # uneven weights: not a constant loss
        (y * r).sum().backward()
        (y_ref * r).sum().backward()
        assert_close(x_ours.grad, x_ref.grad, f"step {i}: input grad")
        assert_same_state(model, reference, f"step {i}")
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
    assert int(model.block[1].num_batches_tracked) == 2 * (4 + 5)
