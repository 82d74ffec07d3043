"""GPU update-only step benchmark (what `make gpu-check` runs on a machine with a GPU).

The optimizer step between Hessian recomputations on three float32 parameter sets —
ResNet-50's (25.6M parameters, 161 tensors), a 350M-parameter transformer's, and 1,000
tensors of 1-4k elements — for AdaHessian fused, AdaHessian reference and
torch.optim.Adam(fused=True). CUDA events, warm-up, interleaved rounds, medians; the
achieved bandwidth counts 32 bytes per element for AdaHessian (reads p, grad, m, v, D;
writes p, m, v) and 28 for Adam, against a device-to-device copy_ measured in the same
run; kernel launches per step come from torch.profiler.

    python -m benchmarks.bench_gpu --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

import torch

from tools.gpu_check import source_commit

from . import common


def launches(fn):
    """CUDA kernels launched by one call of fn (memcpy/memset counted apart)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for k in kinds if k.lower().startswith(("memcpy", "memset")))
    return len(kinds) - copies, copies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=10, help="steps per timed sample")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "bench_gpu.py needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    sets = {"resnet50": common.resnet50_shapes(), "transformer-350M": common.transformer_350m_shapes(),
            "1000 small": common.small_shapes()}

    rows = []
    copy_numel = 256 * 1024 * 1024  # 1 GiB of float32
    copy_ms = statistics.median(common.interleaved_ms(
        {"copy_": common.copy_step(copy_numel, device)}, args.rounds, repeats=5, device=device)["copy_"])
    copy_gbs = 2 * 4 * copy_numel / copy_ms / 1e6

    for name, shapes in sets.items():
        numel = common.numel(shapes)
        runs = {impl: make(shapes, device) for impl, make in common.UPDATE_IMPLS.items()}
        samples = common.interleaved_ms(runs, args.rounds, repeats=args.repeats, device=device)
        for impl, fn in runs.items():
            ms = statistics.median(samples[impl])
            kernels, copies = launches(fn)
            rows.append(dict(set=name, tensors=len(shapes), params=numel, impl=impl, median_ms=ms,
                             min_ms=min(samples[impl]), max_ms=max(samples[impl]),
                             gbs=common.gb_per_s(impl, numel, ms),
                             kernels_per_step=kernels, copies_per_step=copies))
        del runs
        torch.cuda.empty_cache()

    for r in rows:
        fused = next(x for x in rows if x["set"] == r["set"] and x["impl"] == "adahessian fused")
        r["fused_speedup"] = r["median_ms"] / fused["median_ms"]
        r["fraction_of_copy_bandwidth"] = r["gbs"] / copy_gbs

    commit = source_commit()
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda, commit=commit,
        copy_gbs=copy_gbs, rounds=args.rounds, repeats=args.repeats, rows=rows,
    )
    lines = [f"{result['device']}, torch {result['torch']} (CUDA {result['cuda']}), commit {commit[:10]}, "
             f"{result['date']}; device-to-device copy_: {copy_gbs:.0f} GB/s (read + write)", "",
             "| set | implementation | ms/step | GB/s | of copy_ | fused is faster by | kernels/step |",
             "| :-- | :-- | --: | --: | --: | --: | --: |"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['impl']} | {r['median_ms']:.3f} | {r['gbs']:.0f} | "
                     f"{r['fraction_of_copy_bandwidth']:.0%} | {r['fused_speedup']:.2f}x | {r['kernels_per_step']} |")
    table = "\n".join(lines) + "\n"
    common.write_results(args.out, "bench_gpu", result, table)
    print(table)
    return result


if __name__ == "__main__":
    main()
