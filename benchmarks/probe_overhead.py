"""Where the CPU time of an eager fxghost layer step goes on a GPU host (a development probe).

    python benchmarks/probe_overhead.py

For the CPU-bound layer cases: the time to queue one step (and its wall time) for plain
BatchNorm and fxghost with Triton's dispatch (``jit``) and with direct launches (``direct``), the
same for the pieces of the step, and a cProfile of fxghost's steps.
"""

from __future__ import annotations

import copy
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxghost  # noqa: E402
from fxghost import backends  # noqa: E402
from fxghost.backends import triton as _triton  # noqa: E402
from fxghost.backends.triton import launch  # noqa: E402

DEV = torch.device("cuda")


def per_step(fn, n: int = 200, reps: int = 5) -> tuple[float, float]:
    """Median (queue us, wall us) per call over ``reps`` rounds of ``n`` calls."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        q = time.perf_counter() - t
        torch.cuda.synchronize()
        w = time.perf_counter() - t
        res.append((q / n * 1e6, w / n * 1e6))
    res.sort()
    return res[len(res) // 2]


def _pieces(
    mode: str, x: torch.Tensor, dy: torch.Tensor, bn: nn.Module, g: int
) -> list[tuple[str, float, float]]:
    """The host functions of the Triton path, one at a time."""
    xg = x.view(x.shape[0] // g, g, *x.shape[1:])
    w, b = bn.weight.detach(), bn.bias.detach()
    rows = [(f"forward_stats [{mode}]", *per_step(lambda: _triton.forward_stats(xg, w, b, 1e-5)))]
    mean, var, rstd, scale, shift = _triton.forward_stats(xg, w, b, 1e-5)
    out = torch.empty_like(xg)
    rows.append(
        (f"normalize [{mode}]", *per_step(lambda: _triton.normalize(xg, scale, shift, out=out)))
    )
    dyg = dy.view(xg.shape)
    rows.append(
        (f"backward_sums [{mode}]", *per_step(lambda: _triton.backward_sums(dyg, xg, mean, rstd)))
    )
    s1, s2, _, _ = _triton.backward_sums(dyg, xg, mean, rstd)
    rows.append(
        (
            f"backward_apply [{mode}]",
            *per_step(lambda: _triton.backward_apply(dyg, xg, mean, rstd, w, s1, s2, g)),
        )
    )
    return rows


def case(shape: tuple[int, ...], g: int, dtype: torch.dtype, cl: bool) -> None:
    print(f"\n## {shape} {dtype} {'cl' if cl else ''} g={g}", flush=True)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(shape, device=DEV).to(dtype, memory_format=fmt).requires_grad_()
    dy = torch.randn(shape, device=DEV).to(dtype, memory_format=fmt)
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1]).to(DEV)
    plain = nn.Sequential(copy.deepcopy(bn))
    gm = fxghost.transform(nn.Sequential(bn), g)
    params = list(gm.parameters()) + list(plain.parameters())

    def step(m):
        def f():
            m(x).backward(dy)
            x.grad = None
            for p in params:
                p.grad = None

        return f

    rows = []
    rows.append(("plain step", *per_step(step(plain))))
    for mode in ("jit", "direct"):
        launch.DIRECT_LAUNCH = mode == "direct"
        rows.append((f"fxghost step [{mode}]", *per_step(step(gm))))
        rows.append((f"fxghost forward [{mode}]", *per_step(lambda: gm(x))))
        rows += _pieces(mode, x.detach(), dy, bn, g)
    launch.DIRECT_LAUNCH = True
    xg = x.detach().view(shape[0] // g, g, *shape[1:])
    rows.append(
        (
            "torch.empty((G,C))",
            *per_step(lambda: torch.empty((shape[0] // g, shape[1]), device=DEV)),
        )
    )
    rows.append(("torch.empty_like(x)", *per_step(lambda: torch.empty_like(x))))
    rows.append(("x.view(grouped)", *per_step(lambda: x.view(shape[0] // g, g, *shape[1:]))))
    rows.append(("implementation_for(xg)", *per_step(lambda: backends.implementation_for(xg))))
    rows.append(("launch_plan(xg)", *per_step(lambda: launch.launch_plan(xg))))
    for name, q, w in rows:
        print(f"{name:32s} queue {q:8.1f} us   wall {w:8.1f} us", flush=True)

    pr = cProfile.Profile()
    f = step(gm)
    pr.enable()
    for _ in range(300):
        f()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40)
    print("\n".join(s.getvalue().splitlines()[:60]), flush=True)


def main() -> None:
    import triton

    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    print("direct launch supported:", launch.direct_launch_supported(), flush=True)
    case((16384, 512), 128, torch.float32, False)
    case((256, 2048, 7, 7), 32, torch.bfloat16, True)


if __name__ == "__main__":
    main()
