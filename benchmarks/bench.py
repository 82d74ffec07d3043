"""Training-iteration benchmark: AdaHessian against torch.optim.Adam on real models.

One iteration = forward, backward (with ``create_graph`` when AdaHessian's step is a
Hessian step), optimizer step. Implementations are timed in interleaved rounds (so a
slow spell of a shared machine hits them all alike); the table reports medians and the
spread between the 25th and 75th percentiles, and ratios against Adam.

    python benchmarks/bench.py                 # about two minutes on 2 CPU cores
    python benchmarks/bench.py --quick         # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from adahessian import AdaHessian, backends, math_attention


class SmallResNet(nn.Module):
    """A ResNet-style CNN for 3x32x32 inputs: a stem, residual blocks, a linear head."""

    def __init__(self, width=32, blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyLM(nn.Module):
    """A small causal transformer language model (pre-norm encoder layers)."""

    def __init__(self, vocab=256, dim=64, heads=4, layers=2, seq=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.out(self.encoder(h, mask=self.mask, is_causal=True))


def workloads(quick: bool):
    g = torch.Generator().manual_seed(0)
    batch = 8 if quick else 32
    images = torch.randn(batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    tokens = torch.randint(0, 256, (4 if quick else 16, 33), generator=g)
    return {
        "cnn": dict(
            model=lambda: SmallResNet(width=16 if quick else 32),
            loss=lambda m: F.cross_entropy(m(images), labels),
        ),
        "transformer": dict(
            model=lambda: TinyLM(),
            loss=lambda m: F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()),
        ),
    }


def implementations():
    impls = {
        "adam": lambda params: torch.optim.Adam(params, lr=1e-3, fused=True),
    }
    available = ["reference"]
    if backends.fused_unavailable_reason(torch.device("cpu")) is None:
        available.append("fused")
    for backend in available:
        for update_each in (1, 10):
            name = f"adahessian-{backend}" + (f"-ue{update_each}" if update_each > 1 else "")
            impls[name] = lambda params, b=backend, u=update_each: AdaHessian(
                params, lr=0.1, update_each=u, backend=b
            )
    return impls


def make_iteration(work, make_opt):
    torch.manual_seed(0)
    model = work["model"]()
    opt = make_opt(model.parameters())
    second_order = isinstance(opt, AdaHessian)

    def iteration():
        opt.zero_grad(set_to_none=True)
        with math_attention():  # fused SDPA kernels have no double backward
            loss = work["loss"](model)
        loss.backward(create_graph=second_order and opt.hessian_due)
        opt.step()
        return loss

    return iteration


def measure(args):
    works = workloads(args.quick)
    impls = implementations()
    selected = [w for w in works if args.workload in ("all", w)]
    runs = {(w, i): make_iteration(works[w], impls[i]) for w in selected for i in impls}
    for it in runs.values():  # warm-up: allocator, autograd caches, first-step state
        for _ in range(args.warmup):
            it()
    samples = {k: [] for k in runs}
    with tqdm(total=args.rounds * len(runs), desc="rounds", disable=args.quiet) as bar:
        for _ in range(args.rounds):
            for key, it in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    it()
                samples[key].append((time.perf_counter() - start) / args.steps * 1e3)
                bar.update()
    return selected, list(impls), samples


def summarize(selected, impl_names, samples):
    rows = []
    for w in selected:
        adam = statistics.median(samples[(w, "adam")])
        for i in impl_names:
            ms = samples[(w, i)]
            q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
            med = statistics.median(ms)
            rows.append(dict(workload=w, impl=i, median_ms=med, p25_ms=q[0], p75_ms=q[2], vs_adam=med / adam))
    return rows


def print_table(rows):
    print(f"\n{'workload':<12} {'implementation':<26} {'ms/iter':>9} {'p25..p75':>17} {'x Adam':>7}")
    for r in rows:
        spread = f"{r['p25_ms']:.1f}..{r['p75_ms']:.1f}"
        print(f"{r['workload']:<12} {r['impl']:<26} {r['median_ms']:>9.1f} {spread:>17} {r['vs_adam']:>7.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all", choices=["all", "cnn", "transformer"])
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=None, help="iterations per round")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts: a smoke run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 15)
    # update_each=10 variants: a multiple of 10 iterations per round keeps their Hessian share exact.
    args.steps = args.steps or (1 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    selected, impl_names, samples = measure(args)
    rows = summarize(selected, impl_names, samples)
    print_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        threads=torch.get_num_threads(),
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        rounds=args.rounds,
        steps_per_round=args.steps,
        rows=rows,
        samples_ms={f"{w}/{i}": s for (w, i), s in samples.items()},
    )
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
