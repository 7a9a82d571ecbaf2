"""Train a torchvision ResNet-18 with ghost BatchNorm under DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --device cpu
    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py --device cuda --compile

The data are generated: each image is its class's fixed random pattern under noise, so there is
something to learn, and rank 0 prints the global batch's mean loss every ten steps. Every process
draws the same global batch for a step and trains on its own shard of it, as a
``DistributedSampler`` would hand it out. Ghost batches are formed per process, from that shard,
so ``--ghost-batch-size`` must not exceed ``--batch-size`` (the per-process batch). The model is
rewritten with ``fxghost.transform`` after it is on its device and before
``DistributedDataParallel`` wraps it; the original ``model`` holds the trained weights and
statistics, which ``--out`` saves.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fxghost

NUM_CLASSES = 10
NOISE = 2.0  # the noise's standard deviation; the patterns' is 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the DDP module")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64, help="samples per process and step")
    p.add_argument("--ghost-batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument(
        "--lr",
        type=float,
        default=0.02,
        help="SGD's, with momentum 0.9 (at 0.1 the loss rises at first, or for good with small "
        "batches)",
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="each rank saves its final state to OUT/rank<r>.pt")
    return p.parse_args(argv)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights in every process
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def global_batch(
    step: int, n: int, image_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch of ``n`` images and labels, the same in every process: each image
    is its class's fixed pattern under noise, so that there is something to learn."""
    shape = (3, image_size, image_size)
    patterns = torch.randn(
        NUM_CLASSES, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    noise = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return patterns[y] + NOISE * noise, y


def shards(
    args: argparse.Namespace, world: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, every rank's (images, labels)."""
    for step in range(args.steps):
        x, y = global_batch(step, args.batch_size * world, args.image_size, args.seed)
        yield list(zip(x.chunk(world), y.chunk(world), strict=True))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)

    model = make_model(args.seed).to(device, dtype)
    gm = fxghost.transform(model, ghost_batch_size=args.ghost_batch_size)
    ddp = DDP(gm, device_ids=[local_rank] if cuda else None)
    step_fn = torch.compile(ddp) if args.compile else ddp
    opt = make_optimizer(model, args.lr)
    if rank == 0:
        print(fxghost.report(gm).summary(), flush=True)

    start = time.perf_counter()
    ddp.train()
    # Summed since the last line printed: one step's loss on a small batch is too noisy to show
    # the trend.
    loss_sum, first = torch.zeros((), device=device, dtype=torch.float64), 0
    for step, per_rank in enumerate(shards(args, world)):
        x, y = (t.to(device) for t in per_rank[rank])
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(step_fn(x.to(dtype)), y)
        loss.backward()
        opt.step()
        loss_sum += loss.detach()
        if step % 10 == 0 or step == args.steps - 1:
            dist.all_reduce(loss_sum)  # the global batch's loss, not rank 0's shard's
            if rank == 0:
                mean = loss_sum.item() / world / (step + 1 - first)
                steps = f"step {step}" if step == first else f"steps {first}-{step}"
                print(f"{steps}: mean loss {mean:.4f}", flush=True)
            loss_sum.zero_()
            first = step + 1
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s", flush=True)

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"state_dict": model.state_dict(), "grads": grads}, args.out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
