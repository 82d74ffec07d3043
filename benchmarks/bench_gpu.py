"""GPU benchmark (what `make gpu-check` runs on a machine with a GPU).

The optimizer step between Hessian recomputations (update only) on these parameter
sets: ResNet-50's (25.6M parameters, 161 tensors) in float32, with
average_conv_kernel on, with it on and channels-last conv weights, and in bfloat16; a
350M-parameter transformer's; and 1,000 tensors of 1-4k elements; for AdaHessian fused,
AdaHessian reference and torch.optim.Adam(fused=True). Then a whole Hessian iteration
(zero_grad, forward, backward(create_graph=True), the step with its Hessian-vector
product and update) on a wide CIFAR ResNet defined in benchmarks/common.py (no
torchvision needed), against an Adam iteration. CUDA events, warm-up, interleaved
rounds, medians; the achieved bandwidth of an update counts the bytes common.gb_per_s
says (32 per float32 element for AdaHessian, 28 for Adam), against a device-to-device
copy_ measured in the same run; kernel launches per step come from torch.profiler.

    python -m benchmarks.bench_gpu --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import warnings
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


# name -> (parameter shapes, options of common.UPDATE_IMPLS)
def update_sets() -> dict:
    resnet50 = common.resnet50_shapes()
    return {
        "resnet50": (resnet50, {}),
        "resnet50 averaged": (resnet50, dict(average_conv_kernel=True)),
        "resnet50 averaged channels-last": (resnet50, dict(average_conv_kernel=True, channels_last=True)),
        "resnet50 bfloat16": (resnet50, dict(dtype=torch.bfloat16)),
        "transformer-350M": (common.transformer_350m_shapes(), {}),
        "1000 small": (common.small_shapes(), {}),
    }


HESSIAN_SET = "wide cifar-resnet, hessian iteration"
HESSIAN_BATCH = 128


def hessian_iterations(device: torch.device) -> dict:
    """One training iteration per implementation on the same model and batch: AdaHessian
    with a Hessian-vector product on every step (average_conv_kernel, the CNN setting),
    Adam with a plain backward."""
    import torch.nn.functional as F

    from adahessian import AdaHessian

    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(HESSIAN_BATCH, 3, 32, 32, generator=g, device=device)
    y = torch.randint(0, 10, (HESSIAN_BATCH,), generator=g, device=device)

    def make(impl):
        torch.manual_seed(0)
        model = common.CifarResNet(widths=(64, 128, 256)).to(device)
        if impl == "adam fused":
            opt, create_graph = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), False
        else:
            opt = AdaHessian(model.parameters(), lr=0.1, eps=1e-4, average_conv_kernel=True,
                             backend=impl.removeprefix("adahessian "))
            create_graph = True

        def iteration():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward(create_graph=create_graph)
            opt.step()

        return iteration, sum(p.numel() for p in model.parameters())

    return {impl: make(impl) for impl in common.UPDATE_IMPLS}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=10, help="update steps per timed sample")
    args = parser.parse_args(argv)
    assert torch.cuda.is_available(), "bench_gpu.py needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")

    rows = []
    copy_numel = 256 * 1024 * 1024  # 1 GiB of float32
    copy_ms = statistics.median(common.interleaved_ms(
        {"copy_": common.copy_step(copy_numel, device)}, args.rounds, repeats=5, device=device)["copy_"])
    copy_gbs = 2 * 4 * copy_numel / copy_ms / 1e6

    def measure(name, runs, numel, tensors, repeats, dtype=None):
        samples = common.interleaved_ms(runs, args.rounds, repeats=repeats, device=device)
        for impl, fn in runs.items():
            ms = statistics.median(samples[impl])
            kernels, copies = launches(fn)
            gbs = common.gb_per_s(impl, numel, ms, dtype) if dtype is not None else None
            rows.append(dict(set=name, tensors=tensors, params=numel, impl=impl, median_ms=ms,
                             min_ms=min(samples[impl]), max_ms=max(samples[impl]), gbs=gbs,
                             fraction_of_copy_bandwidth=gbs / copy_gbs if gbs is not None else None,
                             kernels_per_step=kernels, copies_per_step=copies))
        fused = next(r for r in rows if r["set"] == name and r["impl"] == "adahessian fused")
        for r in rows:
            if r["set"] == name:
                r["fused_speedup"] = r["median_ms"] / fused["median_ms"]
        torch.cuda.empty_cache()

    for name, (shapes, options) in update_sets().items():
        runs = {impl: make(shapes, device, **options) for impl, make in common.UPDATE_IMPLS.items()}
        measure(name, runs, common.numel(shapes), len(shapes), args.repeats, options.get("dtype", torch.float32))
        del runs
    made = hessian_iterations(device)
    measure(HESSIAN_SET, {impl: fn for impl, (fn, _) in made.items()}, next(iter(made.values()))[1],
            None, repeats=2)
    del made

    commit = source_commit()
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda, commit=commit,
        copy_gbs=copy_gbs, rounds=args.rounds, repeats=args.repeats, hessian_batch=HESSIAN_BATCH, rows=rows,
    )
    table = markdown(result)
    common.write_results(args.out, "bench_gpu", result, table)
    print(table)
    return result


def markdown(result: dict) -> str:
    lines = [f"{result['device']}, torch {result['torch']} (CUDA {result['cuda']}), commit {result['commit'][:10]}, "
             f"{result['date']}; device-to-device copy_: {result['copy_gbs']:.0f} GB/s (read + write)", "",
             "| set | implementation | ms/step | GB/s | of copy_ | fused is faster by | kernels/step |",
             "| :-- | :-- | --: | --: | --: | --: | --: |"]
    for r in result["rows"]:
        gbs = f"{r['gbs']:.0f}" if r["gbs"] is not None else ""
        share = f"{r['fraction_of_copy_bandwidth']:.0%}" if r["fraction_of_copy_bandwidth"] is not None else ""
        lines.append(f"| {r['set']} | {r['impl']} | {r['median_ms']:.3f} | {gbs} | {share} | "
                     f"{r['fused_speedup']:.2f}x | {r['kernels_per_step']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
