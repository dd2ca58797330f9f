"""The processes of tests/test_sync.py: each runs every scenario as one rank of a gloo
group and saves what it computed; the test compares that with one native batch norm over
the whole batch."""
import datetime
import os

import torch
import torch.distributed as dist

import batchnorm_ext

CHANNELS, HEIGHT, WIDTH = 5, 4, 3


def full_batch(seed, batch, layout, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, CHANNELS, HEIGHT, WIDTH, generator=g) * 2 + 1).to(dtype)
    grad = torch.randn(batch, CHANNELS, HEIGHT, WIDTH, generator=g).to(dtype)
    if layout == "channels_last":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    return x, grad


def module_state(seed, momentum, affine):
    native = torch.nn.BatchNorm2d(CHANNELS, momentum=momentum, affine=affine)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if affine:
            native.weight.copy_(torch.rand(CHANNELS, generator=g) + 0.5)
            native.bias.copy_(torch.randn(CHANNELS, generator=g))
        native.running_mean.copy_(torch.randn(CHANNELS, generator=g))
    return native.state_dict()


def ddp_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 1), torch.nn.BatchNorm2d(4, momentum=None), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3))


def ddp_data(seed, step, batch):
    g = torch.Generator().manual_seed(seed * 100 + step)
    return torch.randn(batch, 3, 6, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)


def run(rank, world_size, init_file, out_dir, scenarios, ddp_steps):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for name, (seed, batches, layout, momentum, affine, steps, dtype, param_dtype) in scenarios.items():
        state = module_state(seed, momentum, affine)
        bn = batchnorm_ext.SyncBatchNorm(CHANNELS, momentum=momentum, affine=affine)
        bn.load_state_dict(state)
        bn.to(param_dtype)
        outputs = []
        for step in range(steps):
            x, grad = full_batch(seed + step, sum(batches), layout, dtype)
            start = sum(batches[:rank])
            mine = x[start:start + batches[rank]].clone().requires_grad_()
            y = bn(mine)
            y.backward(grad[start:start + batches[rank]])
            outputs.append((y.detach(), mine.grad))
        results[name] = {
            "outputs": outputs,
            "weight_grad": None if bn.weight is None else bn.weight.grad,
            "bias_grad": None if bn.bias is None else bn.bias.grad,
            "buffers": {k: v.clone() for k, v in bn.named_buffers()},
        }
    if ddp_steps:
        seed, batch = 7, 4
        model = batchnorm_ext.SyncBatchNorm.convert_sync_batchnorm(ddp_model(seed))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(ddp_steps):
            x, target = ddp_data(seed, step, batch * world_size)
            optimizer.zero_grad()
            out = ddp(x[rank * batch:(rank + 1) * batch])
            # A sum over this process's samples, divided so that DDP's average of the
            # gradients is the gradient of the mean over the whole batch.
            loss = torch.nn.functional.cross_entropy(out, target[rank * batch:(rank + 1) * batch],
                                                     reduction="sum") / (batch * world_size) * world_size
            loss.backward()
            optimizer.step()
        results["ddp"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # torch's gloo teardown sometimes aborts a process at interpreter exit, after the work
    # is done ("terminate called without an active exception"; seen with plain
    # torch.nn.BatchNorm2d too, see test_example_runs_with_torchrun): the results are saved,
    # so the process leaves without the interpreter's teardown.
    os._exit(0)
