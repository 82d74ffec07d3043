"""A DistributedDataParallel-wrapped model on the exact (double-backward) path: every
backward runs under ``ddp_model.no_sync()`` and AdaHessian's ``process_group`` averages
the gradients and the Hessian-vector products. Two gloo ranks on shards equal one process
on the whole batch, and stay bitwise equal; without ``no_sync`` DDP's reducer fails on
``create_graph=True``."""

import multiprocessing
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dist_worker
import tolerances
from adahessian import AdaHessian

WORLD = 2
DEADLINE_S = 120


def train_ddp(config, backend, rank):
    """dist_worker's training on this rank's shard, through a DDP wrapper."""
    ddp = DistributedDataParallel(dist_worker.make_model())
    opt = AdaHessian(ddp.parameters(), backend=backend, process_group="world", **dist_worker.CONFIGS[config])
    per = dist_worker.PER_RANK
    for x, y in dist_worker.batches(WORLD):
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        opt.zero_grad()
        with ddp.no_sync():  # DDP's reducer stays out; process_group reduces at step()
            torch.nn.functional.cross_entropy(ddp(x), y).backward(create_graph=opt.hessian_due)
        opt.step()
    return [p.detach().clone() for p in ddp.module.parameters()]


def without_no_sync():
    """What DDP's own reducer does with create_graph=True: the error message."""
    ddp = DistributedDataParallel(dist_worker.make_model())
    x, y = dist_worker.batches(WORLD)[0]
    try:
        torch.nn.functional.cross_entropy(ddp(x), y).backward(create_graph=True)
    except RuntimeError as err:
        return str(err)
    return "no error"


def run(rank, init_file, out_file, backend):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=20)
    )
    torch.set_num_threads(1)
    try:
        result = {name: train_ddp(name, backend, rank) for name in dist_worker.CONFIGS}
        result["without_no_sync"] = without_no_sync()
        torch.save(result, out_file)
    except Exception:
        traceback.print_exc()
        sys.exit(3)
    finally:
        dist.destroy_process_group()


def test_ddp_wrapped_model_under_no_sync_equals_one_process(tmp_path, backend):
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    procs = [ctx.Process(target=run, args=(r, str(tmp_path / "init"), str(outs[r]), backend)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD
    results = [torch.load(o, weights_only=False) for o in outs]
    for name in dist_worker.CONFIGS:
        oracle = dist_worker.train(name, backend, WORLD)
        for rank, result in enumerate(results):
            for p, q in zip(result[name], results[0][name]):
                assert torch.equal(p, q), f"{name}: rank {rank} differs from rank 0"
            for p, q in zip(result[name], oracle):
                tolerances.assert_trajectory_close(p, q, dist_worker.STEPS, name)
        initial = list(dist_worker.make_model().parameters())
        assert not torch.equal(results[0][name][0], initial[0].detach()), f"{name}: nothing trained"
    # Why no_sync is needed: DDP's reducer writes the averaged gradients in place into
    # gradients that carry a graph (torch 2.13 and 2.14 raise this).
    for result in results:
        assert "in-place operation" in result["without_no_sync"], result["without_no_sync"]
