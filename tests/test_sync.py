"""SyncBatchNorm on CPU with gloo: 2 and 3 processes (file rendezvous), compared with one
native BatchNorm2d over the concatenated batch: outputs, input gradients, summed parameter
gradients, running statistics; uneven batches and a process with an empty batch; a few
DistributedDataParallel training steps.  Processes are always cleaned up."""
import copy
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import batchnorm_ext
import sync_worker
from helpers import assert_close

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
# name: (seed, batch of each process, layout, momentum, affine, steps, input dtype,
#        parameter and buffer dtype)
SCENARIOS = {
    2: {"even": (1, [3, 3], "contiguous", 0.1, True, 2, F32, F32),
        "uneven, channels_last": (2, [5, 2], "channels_last", 0.1, True, 2, F32, F32),
        "one empty, cumulative": (3, [4, 0], "contiguous", None, True, 2, F32, F32),
        "no affine": (4, [2, 3], "contiguous", 0.3, False, 1, F32, F32),
        "float64": (9, [3, 4], "channels_last", 0.1, True, 2, F64, F64),
        "bfloat16": (10, [4, 3], "contiguous", 0.1, True, 2, BF16, BF16),
        "bfloat16, float32 parameters": (11, [2, 5], "channels_last", None, True, 2, BF16, F32)},
    3: {"even": (5, [2, 2, 2], "contiguous", 0.1, True, 2, F32, F32),
        "uneven with an empty one": (6, [3, 0, 4], "channels_last", 0.1, True, 2, F32, F32),
        "mostly one": (8, [1, 6, 1], "contiguous", None, True, 1, F32, F32),
        "float64": (12, [2, 3, 2], "contiguous", 0.1, True, 1, F64, F64),
        "bfloat16, float32 parameters": (13, [3, 1, 4], "contiguous", 0.1, True, 2, BF16, F32)},
}
DDP_STEPS = 3


def launch(world_size, tmp_path, timeout=240):
    init_file = tmp_path / "rendezvous"
    context = mp.start_processes(
        sync_worker.run, args=(world_size, str(init_file), str(tmp_path), SCENARIOS[world_size], DDP_STEPS),
        nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} processes did not finish in {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


def native_over_all(name, scenario, ranks, in_float64=False):
    """Native BatchNorm2d over the concatenated batch, with the processes' input and
    parameters (or these, as they are, in float64), and ours (the processes' results put
    together), step by step: a list of (what, ours, native)."""
    seed, batches, layout, momentum, affine, steps, dtype, param_dtype = scenario
    native = torch.nn.BatchNorm2d(sync_worker.CHANNELS, momentum=momentum, affine=affine)
    native.load_state_dict(sync_worker.module_state(seed, momentum, affine))
    native.to(param_dtype)
    if in_float64:
        native.to(torch.float64)
    compared = []
    for step in range(steps):
        x, grad = sync_worker.full_batch(seed + step, sum(batches), layout, dtype)
        if in_float64:
            x, grad = x.double(), grad.double()
        x.requires_grad_()
        y = native(x)
        y.backward(grad)
        compared.append((f"output, step {step}", torch.cat([r[name]["outputs"][step][0] for r in ranks]),
                         y.detach()))
        compared.append((f"grad_input, step {step}",
                         torch.cat([r[name]["outputs"][step][1] for r in ranks]), x.grad))
    if affine:  # each process's parameter gradient is its part: together, native's
        for key in ("weight_grad", "bias_grad"):
            compared.append((key, sum(r[name][key].double() for r in ranks),
                             getattr(native, key.split("_")[0]).grad))
    for r in ranks:
        for key, value in native.named_buffers():
            compared.append((key, r[name]["buffers"][key], value))
    return compared


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_batch_norm_is_one_batch_norm_over_all(world_size, tmp_path):
    ranks = launch(world_size, tmp_path)
    for name, scenario in SCENARIOS[world_size].items():
        dtype, param_dtype = scenario[-2:]
        compared = native_over_all(name, scenario, ranks)
        if dtype != torch.bfloat16:  # native is exact to the dtype's rounding: the reference
            for what, ours, native in compared:
                if what == "num_batches_tracked":
                    assert torch.equal(ours, native), f"{name}: {what}"
                    continue
                assert ours.dtype == native.dtype or what.endswith("_grad"), (name, what)
                if what in ("running_mean", "running_var"):
                    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
                    assert_close(ours, native, **tol, msg=lambda m: f"{name}: {what}: {m}")
                else:
                    scale = 10 if what.endswith("_grad") else 1
                    assert_close(ours.to(native.dtype), native, scale=scale,
                                 msg=lambda m: f"{name}: {what}: {m}")
            continue
        # bfloat16 input: native rounds its statistics to bfloat16 on the way, so both are
        # held to the same batch norm in float64 (input and parameters as given).
        oracle = native_over_all(name, scenario, ranks, in_float64=True)
        for (what, ours, native), (_, _, exact) in zip(compared, oracle):
            if what == "num_batches_tracked":
                assert torch.equal(ours, native) and torch.equal(ours, exact), f"{name}: {what}"
                continue
            if not what.endswith("_grad"):
                assert ours.dtype == native.dtype, (name, what)
            ours_error = (ours.double() - exact.double()).abs().max().item()
            native_error = (native.double() - exact.double()).abs().max().item()
            # Rounding to the result's dtype, once per process for the parameter
            # gradients (each process rounds its part).
            dtype_of = native.dtype if what.endswith("_grad") else ours.dtype
            roundings = world_size if what.endswith("_grad") else 1
            ulp = torch.finfo(dtype_of).eps * exact.double().abs().max().item()
            assert ours_error <= max(native_error, 2 * roundings * ulp), \
                (name, what, ours_error, native_error, ulp)


@pytest.mark.parametrize("world_size", [2])
def test_distributed_data_parallel_training(world_size, tmp_path):
    """A few SGD steps under DistributedDataParallel match one process training native
    batch norm on the whole batch."""
    ranks = launch(world_size, tmp_path)
    model = sync_worker.ddp_model(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(DDP_STEPS):
        x, target = sync_worker.ddp_data(7, step, 4 * world_size)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    for key, value in model.state_dict().items():
        for r in ranks:
            assert_close(r["ddp"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")


def test_same_construction_as_torch():
    ours, native = batchnorm_ext.SyncBatchNorm(6, momentum=None), torch.nn.SyncBatchNorm(6, momentum=None)
    assert repr(ours) == repr(native)
    assert list(ours.state_dict()) == list(native.state_dict())
    ours.load_state_dict(native.state_dict())
    assert ours.process_group is None


def test_without_a_process_group_it_is_plain_batch_norm():
    torch.manual_seed(0)
    sync, native = batchnorm_ext.SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    assert_close(sync(x), native(x))
    assert_close(sync.running_var, native.running_var)
    sync.eval()
    native.eval()
    assert_close(sync(x), native(x))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.randn(4))


def test_convert_sync_batchnorm():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                              batchnorm_ext.BatchNorm1d(4, momentum=None))
    weight = net[1].weight
    net.eval()
    converted = batchnorm_ext.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net))
    assert [type(m) for m in converted] == [torch.nn.Conv2d, batchnorm_ext.SyncBatchNorm,
                                            batchnorm_ext.SyncBatchNorm]
    assert not converted[1].training
    assert converted[2].momentum is None
    assert torch.equal(converted[1].weight, weight)
    same = batchnorm_ext.SyncBatchNorm.convert_sync_batchnorm(net)
    assert same[1].weight is weight  # the very parameters, as torch's conversion keeps them


def test_example_runs_with_torchrun():
    """The README's command for examples/train_syncbn_ddp.py (2 processes, a few steps)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(root, "examples", "train_syncbn_ddp.py"), "--steps", "3"]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # torch's gloo teardown sometimes aborts a process after the work is done ("terminate
    # called without an active exception" at exit): about 1 run in 10 on this project's
    # machines, with plain torch.nn.BatchNorm2d and without batchnorm_ext imported too.
    # Such a run is tried again (at most twice more); any other failure fails at once.
    for attempt in range(3):
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
        teardown_abort = (done.returncode != 0 and "3 steps on 2 processes" in done.stdout
                          and "terminate called without an active exception" in done.stderr)
        if not teardown_abort:
            break
    assert done.returncode == 0, (attempt, done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert "3 steps on 2 processes" in done.stdout
