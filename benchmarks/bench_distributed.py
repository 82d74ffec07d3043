"""Data-parallel AdaHessian on N local CPU processes (gloo over loopback): time per
training iteration, per optimizer step, and the share of the step spent in the
all-reduce of gradients and Hessian-vector products.

    python -m benchmarks.bench_distributed --nprocs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from adahessian import AdaHessian

from .common import CifarResNet, write_results

def iteration(model, opt, x, y):
    """One training iteration: its time, its opt.step()'s and the step's averaging across
    ranks (the distributor's ``last_average_seconds``: bucketing, flatten, collectives,
    copy back), in seconds."""
    start = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=opt.hessian_due)
    mid = time.perf_counter()
    opt.step()
    end = time.perf_counter()
    return end - start, end - mid, opt.distributor.last_average_seconds


def rank_main(rank, args, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.nprocs,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nprocs))
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    rows = []
    for update_each in args.update_each:
        torch.manual_seed(0)
        model = CifarResNet()
        opt = AdaHessian(model.parameters(), lr=0.05, update_each=update_each, process_group="world")
        n_params = sum(p.numel() for p in model.parameters())
        for _ in range(args.warmup):
            iteration(model, opt, x, y)
        iters, steps, comms = zip(*(iteration(model, opt, x, y) for _ in range(args.steps)))
        rows.append(dict(update_each=update_each, params=n_params,
                         iteration_ms=statistics.median(iters) * 1e3, step_ms=statistics.median(steps) * 1e3,
                         comm_ms=statistics.median(comms) * 1e3, comm_share_of_step=sum(comms) / sum(steps),
                         comm_share_of_iteration=sum(comms) / sum(iters)))
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per setting")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--update-each", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "rows.json")
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=rank_main, args=(r, args, init_file, out_file)) for r in range(args.nprocs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        rows = json.loads(Path(out_file).read_text())
    print(f"\n{args.nprocs} ranks (gloo, loopback), ResNet-8 (CIFAR layout, bench.py's CNN), {args.batch} samples per rank")
    print(f"{'update_each':>11} {'iter ms':>8} {'step ms':>8} {'comm ms':>8} {'comm/step':>9} {'comm/iter':>9}")
    for r in rows:
        print(f"{r['update_each']:>11} {r['iteration_ms']:>8.1f} {r['step_ms']:>8.1f} {r['comm_ms']:>8.1f} "
              f"{r['comm_share_of_step']:>9.0%} {r['comm_share_of_iteration']:>9.0%}")
    write_results(args.out, "distributed", dict(nprocs=args.nprocs, torch=torch.__version__, rows=rows))
    return rows


if __name__ == "__main__":
    main()
