"""What the benchmarks share: the parameter sets and models they time, the update-only
implementations (bench_update.py on the CPU, bench_gpu.py on a GPU), timing, quartiles
and results files."""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from adahessian import AdaHessian

CPU = torch.device("cpu")

# ----------------------------------------------------------------- parameter sets


def resnet_shapes(blocks: tuple[int, ...], bottleneck: bool) -> list[tuple[int, ...]]:
    """torchvision's resnet with ``blocks`` per stage, in module order: every conv
    weight, BatchNorm weight and bias, and fc."""
    expansion = 4 if bottleneck else 1
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, count in zip((64, 128, 256, 512), blocks):
        for block in range(count):
            if bottleneck:
                convs = [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            else:
                convs = [(planes, inplanes, 3, 3), (planes, planes, 3, 3)]
            for conv in convs:
                shapes += [conv, conv[:1], conv[:1]]
            if block == 0 and inplanes != planes * expansion:  # the downsampling shortcut
                shapes += [(planes * expansion, inplanes, 1, 1), (planes * expansion,), (planes * expansion,)]
            inplanes = planes * expansion
    return shapes + [(1000, inplanes), (1000,)]


def resnet18_shapes() -> list[tuple[int, ...]]:
    shapes = resnet_shapes((2, 2, 2, 2), bottleneck=False)
    assert len(shapes) == 62 and numel(shapes) == 11_689_512
    return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
    shapes = resnet_shapes((3, 4, 6, 3), bottleneck=True)
    assert len(shapes) == 161 and numel(shapes) == 25_557_032
    return shapes


def transformer_350m_shapes(layers=24, dim=1024, vocab=50257) -> list[tuple[int, ...]]:
    """A GPT-2-medium-like decoder: embeddings, then per layer QKV, projection, MLP, norms."""
    shapes = [(vocab, dim), (1024, dim)]
    for _ in range(layers):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def small_shapes() -> list[tuple[int, ...]]:
    """1,000 tensors of 1-4k elements."""
    g = torch.Generator().manual_seed(0)
    return [(int(n),) for n in torch.randint(1024, 4097, (1000,), generator=g)]


def numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def params_and_grads(shapes, device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False):
    """Random parameters with gradients of ``shapes``; 4-D ones channels-last if asked
    (then their gradients and optimizer state are too)."""
    g = torch.Generator(device=device).manual_seed(1)

    def rand(s):
        t = torch.randn(s, generator=g, device=device).to(dtype)
        return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    params = [nn.Parameter(rand(s)) for s in shapes]
    grads = [rand(s) for s in shapes]
    return params, grads


# ------------------------------------------------------ update-only implementations


def adahessian_step(shapes, device: torch.device, backend: str, dtype: torch.dtype = torch.float32,
                    channels_last: bool = False, average_conv_kernel: bool = False) -> Callable[[], None]:
    """AdaHessian.step() on non-Hessian steps: one Hessian step first creates the state
    (D of a quadratic), then every step reuses D, as between recomputations."""
    params, grads = params_and_grads(shapes, device, dtype, channels_last)
    opt = AdaHessian(params, lr=1e-3, update_each=10**9, backend=backend, average_conv_kernel=average_conv_kernel)
    sum((p * p).sum() for p in params).backward(create_graph=True)
    opt.step()
    for p, g in zip(params, grads):
        p.grad = g
    return opt.step


def adam_step(shapes, device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False,
              average_conv_kernel: bool = False) -> Callable[[], None]:
    """torch.optim.Adam(fused=True).step() (average_conv_kernel: AdaHessian's, ignored)."""
    params, grads = params_and_grads(shapes, device, dtype, channels_last)
    for p, g in zip(params, grads):
        p.grad = g
    return torch.optim.Adam(params, lr=1e-3, fused=True).step


def copy_step(numel: int, device: torch.device) -> Callable[[], torch.Tensor]:
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    return lambda: dst.copy_(src)


# (shapes, device, **options of adahessian_step but backend) -> the step to time
UPDATE_IMPLS = {
    "adahessian fused": lambda shapes, device, **options: adahessian_step(shapes, device, "fused", **options),
    "adahessian reference": lambda shapes, device, **options: adahessian_step(shapes, device, "reference", **options),
    "adam fused": adam_step,
}


def gb_per_s(impl: str, numel: int, ms: float, dtype: torch.dtype = torch.float32) -> float:
    """Memory traffic of an update step: both read p and grad and write p (parameter
    dtype); AdaHessian reads m, v, D and writes m, v in float32 (its state dtype, also
    for bfloat16/float16 parameters): 32 bytes per float32 element, 26 per bfloat16;
    Adam has no D and keeps m, v in the parameter dtype (28 and 14)."""
    p = torch.finfo(dtype).bits // 8
    state = p if impl.startswith("adam") else 4
    return (3 * p + (4 if impl.startswith("adam") else 5) * state) * numel / ms / 1e6


# -------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a strided 1x1 one when the shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet layout (He et al. 2016, section 4.2) with one block per stage
    (ResNet-8): a 3x3 stem, stages of 16/32/64 channels at full, half and quarter
    resolution, global average pooling, a linear head."""

    def __init__(self, widths=(16, 32, 64), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.Sequential(*(
            BasicBlock(cin, cout, 1 if i == 0 else 2) for i, (cin, cout) in enumerate(zip(widths[:1] + widths[:-1], widths))
        ))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


# ------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], repeats: int = 1, device: torch.device = CPU) -> float:
    """Milliseconds per call over ``repeats`` back-to-back calls: CUDA events on a GPU
    (no synchronisation between the calls), perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


def interleaved_ms(runs: dict, rounds: int, *, repeats: int = 1, device: torch.device = CPU,
                   shuffle: Callable[[list], None] | None = None) -> dict:
    """Per key of ``runs``, ms per call in each round. Three warm-up calls each first
    (first-touch page faults, allocator, lazy state); then every round times each run
    once, so a slow spell of the machine hits them all alike, in an order ``shuffle``
    (when given) changes from round to round."""
    for fn in runs.values():
        for _ in range(3):
            fn()
    samples = {key: [] for key in runs}
    order = list(runs)
    for _ in range(rounds):
        if shuffle is not None:
            shuffle(order)
        for key in order:
            samples[key].append(time_ms(runs[key], repeats, device))
    return samples


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75); a single sample is all three."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


# ------------------------------------------------------------------------ results


def write_results(out: Path, stem: str, result: dict, markdown: str | None = None) -> None:
    """OUT/<stem>.json and, given a table, OUT/<stem>.md (OUT created as needed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    if markdown is not None:
        (out / f"{stem}.md").write_text(markdown)


def write_section(path: Path, section: str) -> None:
    """Replace a benchmark's section of a results file (other sections stay): the
    section's first and last lines are its markers, as in RESULTS.md."""
    begin, end = section.splitlines()[0], section.splitlines()[-1]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")
