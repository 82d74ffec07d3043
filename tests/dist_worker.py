"""Code run by each rank of the distributed tests (spawned processes, gloo on loopback),
the launcher that spawns them, and the check the equivalence tests share."""

from __future__ import annotations

import multiprocessing
import socket
import sys
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import tolerances
from adahessian import AdaHessian

# Each config trains the same model; the single-process run on the concatenated batch is the oracle.
CONFIGS = {
    "plain": dict(lr=0.05),
    "update_each": dict(lr=0.05, update_each=3, weight_decay=0.01),
    "n_samples": dict(lr=0.05, n_samples=2, hessian_power=0.5),
}
STEPS = 6
PER_RANK = 4
DEADLINE_S = 120


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(dtype)


def batches(world, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    n = PER_RANK * world
    return [(torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)) for _ in range(STEPS)]


def train(config, backend, world, rank=None, process_group=None):
    """Train on rank's shard of each batch (the whole batch when rank is None)."""
    model = make_model()
    opt = AdaHessian(model.parameters(), backend=backend, process_group=process_group, **CONFIGS[config])
    for x, y in batches(world):
        if rank is not None:
            x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward(create_graph=opt.hessian_due)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def train_ddp_no_sync(config, backend, world, rank):
    """train() on this rank's shard through a DDP wrapper on the exact path: every
    backward under no_sync(), the optimizer's process_group reducing at step()."""
    ddp = DistributedDataParallel(make_model())
    opt = AdaHessian(ddp.parameters(), backend=backend, process_group="world", **CONFIGS[config])
    for x, y in batches(world):
        x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
        opt.zero_grad()
        with ddp.no_sync():  # DDP's reducer stays out; process_group reduces at step()
            torch.nn.functional.cross_entropy(ddp(x), y).backward(create_graph=opt.hessian_due)
        opt.step()
    return [p.detach().clone() for p in ddp.module.parameters()]


def ddp_without_no_sync(world):
    """What DDP's own reducer does with create_graph=True: the error message."""
    ddp = DistributedDataParallel(make_model())
    x, y = batches(world)[0]
    try:
        torch.nn.functional.cross_entropy(ddp(x), y).backward(create_graph=True)
    except RuntimeError as err:
        return str(err)
    return "no error"


def train_ddp_finite_difference(backend, world, rank=None):
    """hvp="finite_difference" on a DistributedDataParallel-wrapped model (its
    gradient_as_bucket_view buckets are what the later evaluations overwrite), no
    process_group: DDP averages both gradients. The whole batch when rank is None."""
    model = make_model()
    module = model if rank is None else torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = AdaHessian(model.parameters(), lr=0.05, update_each=2, n_samples=2, hvp="finite_difference", backend=backend)
    for x, y in batches(world):
        if rank is not None:
            x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def run(rank, world, init_file, out_file, backend, scenario):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=10)
    )
    torch.set_num_threads(1)
    try:
        if scenario == "equivalence":
            result = {name: train(name, backend, world, rank, "world") for name in CONFIGS}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train("plain", backend, world, rank, process_group=None)
            result["warned_without_group"] = sum("drift apart" in str(w.message) for w in caught)
        elif scenario == "ddp_no_sync":
            result = {name: train_ddp_no_sync(name, backend, world, rank) for name in CONFIGS}
            result["without_no_sync"] = ddp_without_no_sync(world)
        elif scenario == "ddp_finite_difference":
            result = train_ddp_finite_difference(backend, world, rank)
        elif scenario == "seed_mismatch":
            model = make_model()
            opt = AdaHessian(model.parameters(), seed=rank, backend=backend, process_group="world")
            model(torch.randn(2, 5, dtype=torch.float64)).sum().backward(create_graph=True)
            try:
                opt.step()
                result = "no error"
            except RuntimeError as err:
                result = str(err)
        elif scenario == "rank_raises":
            if rank == 1:
                raise ValueError("rank 1 fails before its step")
            result = train("plain", backend, world, rank, "world")
        torch.save(result, out_file)
    except Exception:
        traceback.print_exc()
        sys.exit(3)
    finally:
        if dist.is_initialized() and scenario != "rank_raises":
            dist.destroy_process_group()


def launch(tmp_path, world, backend, scenario):
    """Spawn ``world`` ranks running ``scenario``, wait for all within the deadline
    (killing leftovers), and return their exit codes and saved results."""
    ctx = multiprocessing.get_context("spawn")
    init_file = tmp_path / "init"
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    codes = _start_and_wait(
        [ctx.Process(target=run, args=(r, world, str(init_file), str(outs[r]), backend, scenario)) for r in range(world)]
    )
    return codes, [torch.load(o, weights_only=False) if o.exists() else None for o in outs]


def spawn_ranks(target, world, tmp_path, *args) -> list:
    """Run ``target(rank, port, out, *args)`` in ``world`` spawned processes (``port``: a
    free loopback port for their rendezvous, as torchrun's MASTER_PORT; ``out``: the file
    each saves its result to), assert that every rank exits 0 within the deadline, and
    return what they saved. For the frameworks that set up torch.distributed themselves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    codes = _start_and_wait([ctx.Process(target=target, args=(r, port, outs[r], *args)) for r in range(world)])
    assert codes == [0] * world, f"the ranks' exit codes: {codes}"
    return [torch.load(o) for o in outs]


def _start_and_wait(procs) -> list[int]:
    """Start ``procs``, wait for all within the deadline (killing leftovers); their exit codes."""
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"{len(hung)} rank(s) still running after {DEADLINE_S} s"
    return [p.exitcode for p in procs]


def assert_ranks_equal_one_process(results, backend, world):
    """Every config's ranks bitwise equal, and equal to train() on the whole batch
    within the float64 trajectory bound (the ranks' sums over shards round differently
    from the whole batch's)."""
    for name in CONFIGS:
        oracle = train(name, backend, world)
        for rank, result in enumerate(results):
            for p, q in zip(result[name], results[0][name]):
                assert torch.equal(p, q), f"{name}: rank {rank} differs from rank 0"
            for p, q in zip(result[name], oracle):
                tolerances.assert_trajectory_close(p, q, STEPS, name)
        initial = [p.detach() for p in make_model().parameters()]
        assert not torch.equal(results[0][name][0], initial[0]), f"{name}: nothing trained"
