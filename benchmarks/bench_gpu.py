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
import json
import statistics
from pathlib import Path

import torch

from adahessian import AdaHessian
from tools.gpu_check import source_commit


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's resnet50(): conv and BatchNorm weights and biases, and fc."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    assert len(shapes) == 161 and sum(torch.Size(s).numel() for s in shapes) == 25_557_032
    return shapes


def transformer_350m_shapes(layers=24, dim=1024, vocab=50257) -> list[tuple[int, ...]]:
    """A GPT-2-medium-like decoder: embeddings, then per layer QKV, projection, MLP, norms."""
    shapes = [(vocab, dim), (1024, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def small_shapes() -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(int(n),) for n in torch.randint(1024, 4097, (1000,), generator=g)]


def _params(shapes, device):
    g = torch.Generator(device=device).manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, device=device)) for s in shapes]
    grads = [torch.randn(s, generator=g, device=device) for s in shapes]
    return params, grads


def adahessian_step(shapes, device, backend):
    """Non-Hessian steps: one Hessian step creates the state, then every step reuses D."""
    params, grads = _params(shapes, device)
    opt = AdaHessian(params, lr=1e-3, update_each=10**9, backend=backend)
    sum((p * p).sum() for p in params).backward(create_graph=True)
    opt.step()
    for p, g in zip(params, grads):
        p.grad = g
    return opt.step


def adam_step(shapes, device):
    params, grads = _params(shapes, device)
    for p, g in zip(params, grads):
        p.grad = g
    return torch.optim.Adam(params, lr=1e-3, fused=True).step


IMPLS = {
    "adahessian fused": lambda shapes, device: adahessian_step(shapes, device, "fused"),
    "adahessian reference": lambda shapes, device: adahessian_step(shapes, device, "reference"),
    "adam fused": adam_step,
}
BYTES_PER_ELEMENT = {"adahessian fused": 32, "adahessian reference": 32, "adam fused": 28}


def time_ms(fn, repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


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
    sets = {"resnet50": resnet50_shapes(), "transformer-350M": transformer_350m_shapes(), "1000 small": small_shapes()}

    rows = []
    copy_numel = 256 * 1024 * 1024  # 1 GiB of float32
    src, dst = torch.randn(copy_numel, device=device), torch.empty(copy_numel, device=device)
    for _ in range(3):
        dst.copy_(src)
    copy_ms = statistics.median(time_ms(lambda: dst.copy_(src), 5) for _ in range(args.rounds))
    copy_gbs = 2 * 4 * copy_numel / copy_ms / 1e6
    del src, dst

    for name, shapes in sets.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        runs = {impl: make(shapes, device) for impl, make in IMPLS.items()}
        for fn in runs.values():
            for _ in range(3):
                fn()
        samples = {impl: [] for impl in runs}
        for _ in range(args.rounds):
            for impl, fn in runs.items():
                samples[impl].append(time_ms(fn, args.repeats))
        for impl, fn in runs.items():
            ms = statistics.median(samples[impl])
            kernels, copies = launches(fn)
            rows.append(dict(set=name, tensors=len(shapes), params=numel, impl=impl, median_ms=ms,
                             min_ms=min(samples[impl]), max_ms=max(samples[impl]),
                             gbs=BYTES_PER_ELEMENT[impl] * numel / ms / 1e6,
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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps(result, indent=2))
    lines = [f"{result['device']}, torch {result['torch']} (CUDA {result['cuda']}), commit {commit[:10]}, "
             f"{result['date']}; device-to-device copy_: {copy_gbs:.0f} GB/s (read + write)", "",
             "| set | implementation | ms/step | GB/s | of copy_ | fused is faster by | kernels/step |",
             "| :-- | :-- | --: | --: | --: | --: | --: |"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['impl']} | {r['median_ms']:.3f} | {r['gbs']:.0f} | "
                     f"{r['fraction_of_copy_bandwidth']:.0%} | {r['fused_speedup']:.2f}x | {r['kernels_per_step']} |")
    table = "\n".join(lines) + "\n"
    (args.out / "bench_gpu.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
