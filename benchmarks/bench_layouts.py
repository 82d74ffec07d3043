"""The fused step on channels-last conv weights against the same step on contiguous ones.

The fused CPU kernel (torch.ops.adahessian.fused_step_, no optimizer bookkeeping) on
ResNet-18's float32 parameter set (11,689,512 parameters in 62 tensors), its 4-D weights
either contiguous or channels-last (their gradients, state and partial sums alike, as a
channels-last model's are; every 4-D Hz in the layout the double backward returns for
some, memory order I, O, kh, kw: the worst case, one copy each into the weight's). Four
kinds of step: a Hessian step (Hz, 2 samples, D kept) and a step with the kept D, each
with and without conv-kernel averaging. Channels-last tensors are stepped in memory
order, in place; with averaging each kh*kw group's elements lie in_channels apart
(csrc/include/adahessian/host.h, group_stride_of). The ratio channels-last / contiguous
is the cost of the layout; each round times every row once, in a shuffled order.

    python -m benchmarks.bench_layouts                                   # about a minute
    python -m benchmarks.bench_layouts --results benchmarks/RESULTS.md   # also record it
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
from pathlib import Path

import torch

from adahessian import averaging, sampler

from . import common

BEGIN, END = "<!-- bench_layouts: begin -->", "<!-- bench_layouts: end -->"
KINDS = {  # name -> (Hessian step, average_conv_kernel)
    "hessian step, averaged": (True, True),
    "kept D, averaged": (False, True),
    "hessian step": (True, False),
    "kept D": (False, False),
}


def fused_step(shapes, hessian_step: bool, average: bool, channels_last: bool):
    """One fused_step_ call on fresh random tensors, repeatable: the same inputs each time
    (the state it updates drifts, which changes no timing)."""
    g = torch.Generator().manual_seed(0)

    def rand(s, positive=False):
        t = torch.rand(s, generator=g) if positive else torch.randn(s, generator=g)
        return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    params, grads, exp_avgs = ([rand(s) for s in shapes] for _ in range(3))
    exp_hessian_diag_sqs, hessians = [rand(s, True) for s in shapes], [rand(s) for s in shapes]
    # As in tests/cases.py, hz_layout.
    hzs = [rand(s).permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3) if channels_last and len(s) == 4 else rand(s)
           for s in shapes] if hessian_step else []
    partial_sums = [rand(s) for s in shapes] if hessian_step else []
    keys = [sampler.rademacher_key(0, i, 1) for i in range(len(shapes))] if hessian_step else []
    steps = [10] * len(shapes)
    n_samples = 2 if hessian_step else 1
    rules = [averaging.rule_of(s, average_conv_kernel=average, spatial_averaging="conv2d", block_length=1)
             for s in shapes]
    groups = [0 if r is None else r.group for r in rules]

    def step():
        torch.ops.adahessian.fused_step_(
            params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, hzs, [], partial_sums, keys, steps, 1e-3, 0.9,
            0.999, 1e-8, 0.0, 1.0, n_samples, 1.0, groups,
        )

    return step


def report(shapes, samples, command, quick=False):
    stats = {key: common.quartiles(ms) for key, ms in samples.items()}
    lines = [
        BEGIN,
        "## Channels-last conv weights in the fused step (CPU, issue 16)",
        "",
        f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}. Command: `{command}`",
        "",
        f"ResNet-18's float32 set{' (--quick: its first 10 tensors)' if quick else ''} "
        f"({common.numel(shapes):,} parameters), the kernel alone; medians of interleaved rounds.",
        "",
        "| step | contiguous ms | channels-last ms | p25-p75 channels-last | channels-last / contiguous |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        contiguous, (p25, last, p75) = stats[(kind, False)][1], stats[(kind, True)]
        lines.append(f"| {kind} | {contiguous:.2f} | {last:.2f} | {p25:.2f}-{p75:.2f} | {last / contiguous:.2f} |")
    return "\n".join([*lines, END])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--results", type=Path, help="write the table into this markdown file")
    parser.add_argument("--quick", action="store_true", help="ResNet-18's first 10 tensors: a smoke run")
    args = parser.parse_args(argv)
    shapes = common.resnet18_shapes()[: 10 if args.quick else None]
    runs = {(kind, last): fused_step(shapes, *KINDS[kind], channels_last=last) for kind in KINDS for last in (False, True)}
    samples = common.interleaved_ms(runs, args.rounds, shuffle=random.Random(0).shuffle)
    command = " ".join(["python -m", __spec__.name, *(sys.argv[1:] if argv is None else argv)])
    section = report(shapes, samples, command, args.quick)
    print(section)
    if args.results:
        common.write_section(args.results, section)
    return section


if __name__ == "__main__":
    main()
