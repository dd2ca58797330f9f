"""Trains a small CNN with batchnorm_ext.SyncBatchNorm under DistributedDataParallel on the
CPU (gloo), on synthetic data.

One machine, two processes:
    torchrun --standalone --nproc_per_node=2 examples/train_syncbn_ddp.py

Two machines (run on each, NODE = 0 or 1, HOST = the first machine's address):
    torchrun --nnodes=2 --node-rank=NODE --nproc_per_node=2 \
        --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 examples/train_syncbn_ddp.py
"""
import argparse
import time

import torch
import torch.distributed as dist

import batchnorm_ext


def model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="per process")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun provides rank, world size and rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model everywhere
    net = batchnorm_ext.SyncBatchNorm.convert_sync_batchnorm(model())
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

    # Synthetic classification: the class decides the mean colour of the image.
    generator = torch.Generator().manual_seed(1234 + rank)  # different data per process
    start = time.perf_counter()
    for step in range(args.steps):
        target = torch.randint(0, 10, (args.batch,), generator=generator)
        images = torch.randn(args.batch, 3, 32, 32, generator=generator) + target.view(-1, 1, 1, 1) / 5
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(images), target)
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.3f}", flush=True)
    if rank == 0:
        seconds = time.perf_counter() - start
        print(f"{args.steps} steps on {world} processes, batch {args.batch} each: {seconds:.1f} s; "
              f"running mean of the first batch norm: {net[1].running_mean[:3].tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
