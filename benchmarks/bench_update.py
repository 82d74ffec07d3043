"""Update-only step benchmark: the optimizer step between Hessian recomputations.

AdaHessian's fused CPU kernels against its reference path and torch.optim.Adam(fused=True),
on two float32 parameter sets: ResNet-18's (11,689,512 parameters in 62 tensors) and
1,000 tensors of 1-4k elements. Every implementation steps the same shapes with
gradients already in place (no forward or backward). Each round times one step of
every implementation, in a shuffled order, so a slow spell of the machine hits them all
alike and every step finds the caches as another implementation left them (as a
training step finds them after forward and backward); the table reports medians. A
copy_ in the same rounds, of as many bytes as the fused step touches on the ResNet-18
set, measures the bandwidth the update is bound by: the fused step moves 32 bytes per
element (reads p, grad, m, v, D; writes p, m, v), Adam 28.

    python -m benchmarks.bench_update                                   # about a minute
    python -m benchmarks.bench_update --results benchmarks/RESULTS.md   # also record it
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
from pathlib import Path

import torch

from adahessian import functional

from . import common

BEGIN, END = "<!-- bench_update: begin -->", "<!-- bench_update: end -->"
# Per set, from issue 3: (most x fused Adam, least speed-up over the reference path).
TARGETS = {"resnet18": (1.35, 2), "1000 small": (1.0, 4)}


def adahessian_functional(shapes, device):
    """The fused functional core alone: the same kernel call without the optimizer's
    per-parameter Python bookkeeping."""
    params, grads = common.params_and_grads(shapes, device)
    with torch.no_grad():
        state = [[torch.rand_like(p) for p in params] for _ in range(3)]  # m, v, D
    steps = [10] * len(params)

    def step():
        with torch.no_grad():
            functional.adahessian(
                params, grads, *state, steps, estimate=None, n_samples=1, lr=1e-3, beta1=0.9, beta2=0.999,
                eps=1e-8, weight_decay=0.0, hessian_power=1.0, average_conv_kernel=False, backend="fused",
            )

    return step


IMPLS = {**common.UPDATE_IMPLS, "adahessian fused, functional core": adahessian_functional}


def measure(sets, rounds, copy_numel):
    """ms per step of every (set, implementation) and of copy_, in rounds of shuffled order."""
    runs = {(name, impl): make(shapes, common.CPU) for name, shapes in sets.items() for impl, make in IMPLS.items()}
    runs[("copy_", "copy_")] = common.copy_step(copy_numel, common.CPU)
    return common.interleaved_ms(runs, rounds, shuffle=random.Random(0).shuffle)


def report(sets, samples, copy_numel, command):
    stats = {key: common.quartiles(ms) for key, ms in samples.items()}  # (p25, median, p75)

    def median(key):
        return stats[key][1]

    # copy_ moves 12 bytes per float32 element: it reads the source, and each destination
    # line is read (write-allocate) before it is written. The optimizers write only lines
    # they have just read, so their counted bytes are all the traffic there is.
    copy_gbs = 12 * copy_numel / median(("copy_", "copy_")) / 1e6
    lines = [
        BEGIN,
        "## Update-only step (fused CPU kernels, issue 3)",
        "",
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}. "
        f"Command: `{command}`",
        "",
        "Medians of interleaved rounds; GB/s counts 32 bytes per element for AdaHessian, 28 for Adam. "
        f"`copy_` of {copy_numel * 4 >> 20} MiB (the fused step's footprint on ResNet-18) in the same rounds: "
        f"**{copy_gbs:.1f} GB/s** of memory traffic (12 bytes per element: read, write-allocate, write).",
        "",
        "| set | implementation | median ms | p25-p75 ms | x fused Adam | GB/s | % of copy_ |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for name, shapes in sets.items():
        adam = median((name, "adam fused"))
        for impl in IMPLS:
            p25, ms, p75 = stats[(name, impl)]
            gbs = common.gb_per_s(impl, common.numel(shapes), ms)
            lines.append(
                f"| {name} | {impl} | {ms:.2f} | {p25:.2f}-{p75:.2f} "
                f"| {ms / adam:.2f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f}% |"
            )
        fused, reference = median((name, "adahessian fused")), median((name, "adahessian reference"))
        overhead = fused - median((name, "adahessian fused, functional core"))
        verdicts.append((name, fused / adam, reference / fused, overhead))
    lines += ["", "Targets: AdaHessian.step() (fused) against Adam(fused=True).step() and the reference path.", ""]
    for (name, vs_adam, speedup, overhead), (adam_limit, speedup_floor) in zip(verdicts, TARGETS.values()):
        lines.append(
            f"- {name}: {vs_adam:.2f}x fused Adam (target < {adam_limit}x: {_verdict(vs_adam < adam_limit)}), "
            f"{speedup:.1f}x faster than reference (target >= {speedup_floor}x: {_verdict(speedup >= speedup_floor)}); "
            f"the optimizer's Python bookkeeping over the functional core: {overhead:+.2f} ms."
        )
    lines += [
        "",
        "On ResNet-18 the bandwidth floor is 32/28 = 1.14x Adam: AdaHessian also reads D. The difference "
        "between the AdaHessian.step() and functional-core rows is the optimizer's per-parameter Python work "
        "(adahessian/optimizer.py), not the kernel.",
        END,
    ]
    return "\n".join(lines)


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--results", type=Path, help="write the table into this markdown file")
    args = parser.parse_args(argv)
    sets = dict(zip(TARGETS, (common.resnet18_shapes(), common.small_shapes())))
    # The fused step on ResNet-18 touches 5 float32 tensors per parameter; copy_ touches 2.
    copy_numel = common.numel(sets["resnet18"]) * 5 // 2
    samples = measure(sets, args.rounds, copy_numel)
    command = " ".join(["python -m", __spec__.name, *(sys.argv[1:] if argv is None else argv)])
    section = report(sets, samples, copy_numel, command)
    print(section)
    if args.results:
        common.write_section(args.results, section)


if __name__ == "__main__":
    main()
