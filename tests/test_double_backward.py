"""Second derivatives (gradient penalties, Hessian-vector products) through every implementation
that a transformed BatchNorm can run, against numerical derivatives and the chunked reference.

Each eager implementation is reached through ``transform(backend=...)``: the C++ autograd ops
with ``"cpu"``, the torch-ops Function with ``"torch"``; two paths no argument picks on a float64
input are reached by patching the backend: the ctypes Function (the C++ op unavailable) and the
decomposition (what 16-bit inputs take). The Triton
Function runs in float32 only (it does not take float64) under the Triton interpreter, in a
subprocess (see test_triton.py), against the float64 reference with a float32 tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from bn_layers import MISSING, partial_bn, without_bias
from conftest import init_bn, run_checks_interpreted
from torch import Tensor, nn

import fxghost
from fxghost import backends
from fxghost.backends import cpu, torch_ops, triton
from fxghost.reference import apply_chunked_ghost_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
GHOST = 4

needs_kernels = pytest.mark.skipif(
    not cpu.available(), reason="no C compiler: the CPU kernels are not built here"
)
needs_op = pytest.mark.skipif(
    not cpu.op_available(),
    reason="no C++ compiler or torch headers: the CPU autograd op is not built here",
)

# implementation: the name of the backward node its output has (the path is checked, not assumed)
IMPLS = {
    "cpu_autograd_op": "fxghost::GhostNorm",
    "cpu_function": "CpuKernelGhostNormBackward",
    "torch_ops": "TorchOpsGhostNormBackward",
    "decomposition": "VarMeanBackward",
}
IMPL_PARAMS = [
    pytest.param("cpu_autograd_op", marks=needs_op),
    pytest.param("cpu_function", marks=needs_kernels),
    "torch_ops",
    "decomposition",
]

# name: (a BatchNorm, per-sample input shape, channels_last); batches of
# 2 * GHOST samples are whole ghost batches, of 2 * GHOST - 2 end in a shorter one.
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], bool]] = {
    "1d": (lambda: nn.BatchNorm1d(3), (3,), False),
    "1d_no_affine": (lambda: nn.BatchNorm1d(3, affine=False), (3,), False),
    "2d": (lambda: nn.BatchNorm2d(2), (2, 2, 2), False),
    "2d_channels_last": (lambda: nn.BatchNorm2d(2), (2, 2, 2), True),
    # A weight and no bias (bias=False), a bias and no weight (the weight set to None).
    "1d_no_bias": (lambda: without_bias(nn.BatchNorm1d, 3), (3,), False),
    "2d_no_weight": (lambda: partial_bn(nn.BatchNorm2d, 2, "no_weight"), (2, 2, 2), False),
}
BATCHES = {"whole": 2 * GHOST, "tail": 2 * GHOST - 2}


class _AddReLU(nn.Module):
    """A BatchNorm, then a residual add of its input and a ReLU: one fused call."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.bn(x) + x)


# name: MODELS["2d"]'s BatchNorm with an epilogue that transform fuses into its normalization.
EPILOGUES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "2d_relu": lambda bn: nn.Sequential(bn, nn.ReLU()),
    "2d_add_relu": _AddReLU,
}


def _model(name: str) -> nn.Module:
    """``MODELS[name]``'s BatchNorm in float64, in a Sequential; or for a name of
    ``EPILOGUES``, a 2-D one with that epilogue."""
    torch.manual_seed(0)
    if name in EPILOGUES:
        return EPILOGUES[name](init_bn(nn.BatchNorm2d(2), torch.float64))
    return nn.Sequential(init_bn(MODELS[name][0](), torch.float64))


def _sample(name: str) -> tuple[int, ...]:
    return MODELS["2d" if name in EPILOGUES else name][1]


@pytest.fixture
def use(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """The backend that runs one implementation for the transformed layers' eager training
    calls (patching it where no argument reaches the implementation)."""

    def route(impl: str) -> str:
        if impl == "cpu_function":
            monkeypatch.setattr(cpu, "cpp_ops", lambda: None)
        elif impl == "decomposition":

            def decomposed(
                xg: Tensor,
                params: backends.NormParams,
                update: backends.RunningStatsUpdate | None = None,
            ) -> tuple[Tensor, Tensor, Tensor]:
                hook = torch_ops.EAGER.update_hook(update, xg)
                return torch_ops.ghost_norm_decomposed(xg, *params, hook)

            monkeypatch.setattr(torch_ops.EAGER, "norm", decomposed)
        return "cpu" if impl.startswith("cpu") else "torch"

    return route


def _nodes(t: Tensor) -> Iterator[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node.name()
        todo.extend(n for n, _ in node.next_functions)


def _input(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype) -> Tensor:
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("batch", list(BATCHES))
def test_gradgradcheck(use: Callable[[str], str], impl: str, model_name: str, batch: str) -> None:
    """First and second derivatives of a transformed model in training mode with respect to the
    input, weight and bias (and the incoming gradient) match numerical ones."""
    backend = use(impl)
    _, sample, channels_last = MODELS[model_name]
    model = fxghost.transform(_model(model_name), GHOST, backend=backend).train()
    x = _input((BATCHES[batch], *sample), channels_last, torch.float64)
    _check_derivatives(model, impl, x)


def _check_derivatives(model: nn.Module, impl: str, x: Tensor) -> None:
    """gradcheck and gradgradcheck of ``model`` at ``x`` with respect to the input and every
    parameter, after checking that ``impl`` runs its layer."""
    x = x.requires_grad_()
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in model.named_parameters())

    def f(x: Tensor, *params: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, params, strict=True)), (x,))

    assert any(IMPLS[impl] in n for n in _nodes(f(x, *params))), f"{impl} did not run"
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("model_name", list(EPILOGUES))
def test_gradgradcheck_fused_epilogue(
    use: Callable[[str], str], impl: str, model_name: str
) -> None:
    """Through a fused ReLU (and residual add), first and second derivatives match numerical
    ones: the backward's mask is ReLU's own, differentiable in the incoming gradient."""
    backend = use(impl)
    model = fxghost.transform(_model(model_name), GHOST, backend=backend).train()
    kinds = [n.kwargs.get("epilogue") for n in model.graph.nodes if "epilogue" in n.kwargs]
    assert kinds == [model_name.removeprefix("2d_")]
    _check_derivatives(
        model, impl, _input((BATCHES["tail"], *_sample(model_name)), False, torch.float64)
    )


def _penalty_grads(model: nn.Module, x: Tensor, r: Tensor) -> list[Tensor]:
    """A gradient penalty's gradients: g = d loss / d x with create_graph, then (g**2).sum()
    differentiated with respect to x and every parameter (Hessian-vector products)."""
    x = x.clone().requires_grad_()
    loss = (torch.sin(model(x)) * r).sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (g**2).sum().backward()
    assert x.grad is not None
    return [g.detach(), x.grad, *(p.grad for p in model.parameters())]


# name: (a model, float32, whose BatchNorm takes another layer's output, so that the second
# derivatives flow on through it; per-sample input and output shapes; channels_last). The layer
# before has no bias: the BatchNorm would cancel it, and its zero gradient would be all rounding.
Penalty = tuple[nn.Module, tuple[int, ...], tuple[int, ...], bool]


def _penalty_model(name: str) -> Penalty:
    """``name``: "1d" or "2d_channels_last", or one of them with a missing parameter
    ("1d_no_bias", "2d_channels_last_no_weight")."""
    torch.manual_seed(0)
    missing = next((m for m in MISSING if name.endswith(m)), None)
    cls = nn.BatchNorm1d if name.startswith("1d") else nn.BatchNorm2d
    bn = init_bn(cls(3), torch.float32) if missing is None else partial_bn(cls, 3, missing)
    bn = bn.float()
    if name.startswith("1d"):
        return nn.Sequential(nn.Linear(4, 3, bias=False), bn, nn.Tanh()), (4,), (3,), False
    return nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), bn), (2, 3, 2), (3, 3, 2), True


PENALTY_MODELS = ["1d", "2d_channels_last", "1d_no_bias", "2d_channels_last_no_weight"]


def _compare_penalty(
    penalty: Penalty, batch: int, dtype: torch.dtype, rtol: float, node: str, backend: str
) -> None:
    """The penalty's gradients through the transformed model in ``dtype``, whose layer runs the
    backward ``node``, against the chunked reference's in float64, each relative to its largest
    value."""
    model, sample, out_sample, channels_last = penalty
    x = _input((batch, *sample), channels_last, torch.float64)
    r = torch.randn((batch, *out_sample), dtype=torch.float64)
    transformed = fxghost.transform(copy.deepcopy(model).to(dtype), GHOST, backend=backend)
    transformed.train()
    assert any(node in n for n in _nodes(transformed(x.to(dtype)))), f"{node} did not run"
    reference = apply_chunked_ghost_batchnorm(copy.deepcopy(model).double(), GHOST).train()
    got = _penalty_grads(transformed, x.to(dtype), r.to(dtype))
    want = _penalty_grads(reference, x, r)
    names = ["g", "x", *(f"param {n}" for n, _ in model.named_parameters())]
    for name, a, b in zip(names, got, want, strict=True):
        assert a is not None, name
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= rtol * scale, f"{name}: error {err:.3g} for values up to {scale:.3g}"


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("model_name", PENALTY_MODELS)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_gradient_penalty_matches_reference(
    use: Callable[[str], str], impl: str, model_name: str, batch: str
) -> None:
    backend = use(impl)
    # float64 with a few values per channel is ill-conditioned: 1e-10 of the scale is rounding
    penalty = _penalty_model(model_name)
    _compare_penalty(penalty, BATCHES[batch], torch.float64, 1e-10, IMPLS[impl], backend)


def test_triton_interpreted() -> None:
    """The check_* functions below, under the Triton interpreter in a fresh process."""
    triton_module = pytest.importorskip("triton")
    if tuple(int(p) for p in triton_module.__version__.split(".")[:2]) < (3, 4):
        # Its interpreter turns program-id arithmetic into 1-element numpy arrays, which numpy 2
        # refuses as a loop bound; compiled for a GPU, the same kernels take it.
        pytest.skip("Triton 3.3 (torch 2.7)'s interpreter cannot run the split-reduction kernels")
    run_checks_interpreted(__file__, timeout=600)


@pytest.mark.parametrize("model_name", PENALTY_MODELS)
@pytest.mark.parametrize("batch", list(BATCHES))
def check_triton_gradient_penalty(model_name: str, batch: str) -> None:
    """The Triton Function (it takes float32 and 16-bit inputs, not float64) in float32, against
    the float64 reference."""
    if not triton.interpreting():
        pytest.fail("run with TRITON_INTERPRET=1 (test_triton_interpreted does)")
    penalty = _penalty_model(model_name)
    _compare_penalty(
        penalty, BATCHES[batch], torch.float32, 5e-5, "TritonGhostNormBackward", "triton"
    )


def _compiled_penalty(model: nn.Module, x: Tensor, backend: str) -> list[Tensor] | str:
    """The penalty's gradients through ``torch.compile(model)``, or the error it raises."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    r = torch.randn_like(x)
    try:
        return _penalty_grads(compiled, x, r)
    except RuntimeError as e:
        return str(e)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", "eager"])
@pytest.mark.parametrize(
    "model_name", ["1d", "2d", "1d_no_bias", "2d_no_weight", "2d_relu", "2d_add_relu"]
)
@pytest.mark.parametrize("ours", ["auto", pytest.param("cpu", marks=needs_kernels)])
def test_compiled_double_backward_behaves_as_plain(
    backend: str, model_name: str, ours: str
) -> None:
    """Under torch.compile a transformed model does what plain BatchNorm does: AOT autograd
    refuses double backward for both (the same error); dynamo alone runs the ops eagerly, and
    the second derivatives are the reference's. With "auto" the layers take the composite op
    with the decomposition, with "cpu" the C kernels' custom ops (with a fused epilogue, the
    epilogue's)."""
    model, sample = _model(model_name), _sample(model_name)
    x = _input((BATCHES["tail"], *sample), False, torch.float64)
    torch.manual_seed(1)
    plain = _compiled_penalty(copy.deepcopy(model), x, backend)
    torch.manual_seed(1)
    gm = fxghost.transform(copy.deepcopy(model), GHOST, backend=ours)
    got = _compiled_penalty(gm, x, backend)
    if isinstance(plain, str):
        assert "double backward" in plain
        assert got == plain
        return
    assert not isinstance(got, str), got
    torch.manual_seed(1)
    want = _penalty_grads(
        apply_chunked_ghost_batchnorm(copy.deepcopy(model), GHOST), x, torch.randn_like(x)
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * b.abs().max().item())
