"""What AdaHessian costs, against the alternatives, in real training loops.

Workloads: a ResNet-style CNN (ResNet-8 in the CIFAR layout, batch 32 of 3x32x32), a
small transformer language model (its forward runs under ``adahessian.math_attention()``
for every implementation alike: the fused attention kernels have no double backward)
and 1,000 small tensors under a cheap loss (only the optimizer's share is reported).

Implementations: ``AdaHessian(backend="fused")`` where the compiled kernels are
available, ``AdaHessian(backend="reference")``, the same math written here with
``torch._foreach_*`` multi-tensor ops (``ForeachAdaHessian``: the strongest thing a user
can write without a compiler), ``torch.optim.Adam(fused=True)`` as the first-order
floor, and the AdaHessian classes of torch-optimizer and pytorch-optimizer when those
packages are installed.

Each implementation trains each workload (zero_grad, forward, backward with
``create_graph=opt.hessian_due``, step) with update_each=1 and with update_each=10,
and the step inside each iteration is timed too. Measurements:

  update          a step between Hessian recomputations (update_each=10 runs)
  step            a Hessian step: the Hessian-vector product and the update (update_each=10 runs)
  iteration       zero_grad, forward, backward(create_graph=True), step (update_each=1)
  iteration-ue10  the same with update_each=10 and backward(create_graph=opt.hessian_due)
  iteration-sub4  update_each=1, this package's AdaHessian only: a plain backward on the
                  batch and ``opt.hessian_backward`` on a quarter of it (sub8: an eighth)
  iteration-accum4  the batch as 4 micro-batches, each through ``opt.backward``
  iteration-fd    ``hvp="finite_difference"``: ``step(closure)`` with a plain backward,
                  one extra evaluation per Hessian step (fd-central: two)

Adam's update and step are both its step. Timing: three warm-up blocks per run (which
also measure memory), then interleaved rounds: each run does one block per round, in an
order that rotates, so a slow spell of a shared machine hits all alike. The table shows
medians over rounds, the 25th..75th percentiles, and ratios against the reference path
and against Adam (both iteration rows against Adam's iteration).

    python -m benchmarks.bench            # about two minutes on 2 CPU cores
    python -m benchmarks.bench --quick    # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from adahessian import AdaHessian, backends, math_attention

from .common import CifarResNet, quartiles, write_results

UPDATE_EACH = 10
# How this package's AdaHessian computes an iteration's gradients and Hessian besides the
# classic backward(create_graph=...) (README, "Gradient accumulation and a sub-batch
# Hessian", "Without double backward"): the Hessian on 1/k of the batch, the batch as k
# micro-batches, or finite differences of plain gradients.
DIFFERENCES = {"fd": "finite_difference", "fd-central": "central_difference"}
MODES = ("sub4", "sub8", "accum4", *DIFFERENCES)
MEASUREMENTS = ("update", "step", "iteration", f"iteration-ue{UPDATE_EACH}", *(f"iteration-{m}" for m in MODES))
ADAM = "adam"
REFERENCE = "adahessian-reference"

# ----------------------------------------------------------------------------- models


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


class ManySmallTensors(nn.Module):
    """``count`` tensors of 1-4k elements: what the optimizer sees of a model made of many
    small layers. The loss, the sum of cos(p), costs little and has a non-constant Hessian;
    it is summed per tensor because the backward of a slice of one concatenated vector
    writes a zero-filled gradient of the whole vector, 1,000 times per Hessian product."""

    def __init__(self, count=1000):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(1024, 4097, (count,), generator=g).tolist()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(n, generator=g)) for n in sizes)

    def forward(self):
        return torch.stack([p.cos().sum() for p in self.tensors]).sum()


@dataclass
class Workload:
    model: Callable[[], nn.Module]
    loss: Callable[[nn.Module, slice], Tensor]  # (model, the part of the batch) -> mean loss
    batch: int = 1
    # False: only the optimizer's share is reported (update and step rows), and the steps
    # between Hessian steps reuse the last gradients instead of recomputing them.
    iterations: bool = True


def workloads(quick: bool, device: torch.device) -> dict[str, Workload]:
    g = torch.Generator().manual_seed(0)
    size, batch = (16, 8) if quick else (32, 32)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (batch,), generator=g).to(device)
    tokens = torch.randint(0, 256, (4 if quick else 16, 33), generator=g).to(device)
    return {
        "cnn": Workload(
            model=lambda: CifarResNet((4, 8, 16) if quick else (16, 32, 64)),
            loss=lambda m, part=slice(None): F.cross_entropy(m(images[part]), labels[part]),
            batch=batch,
        ),
        "transformer": Workload(
            model=lambda: TinyLM(dim=32 if quick else 64),
            loss=lambda m, part=slice(None): F.cross_entropy(
                m(tokens[part, :-1]).flatten(0, 1), tokens[part, 1:].flatten()
            ),
            batch=len(tokens),
        ),
        "many-small": Workload(
            model=lambda: ManySmallTensors(100 if quick else 1000), loss=lambda m, part=None: m(), iterations=False
        ),
    }


# ---------------------------------------------------------- the foreach implementation


def rademacher_like(params: list[Tensor]) -> list[Tensor]:
    """A Rademacher vector per parameter, drawn as one buffer for all of them (one
    randint instead of one per tensor). Assumes one dtype and device."""
    flat = torch.randint(0, 2, (sum(p.numel() for p in params),), dtype=params[0].dtype, device=params[0].device)
    flat.mul_(2).sub_(1)
    return [z.view_as(p) for z, p in zip(flat.split([p.numel() for p in params]), params)]


def foreach_adahessian_(
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, steps, *, lr, beta1, beta2, eps, weight_decay, hessian_power
):
    """docs/algorithm.md, section 1, steps 3-5, with multi-tensor ops; ``hessians`` holds each D and
    ``steps`` each parameter's step count after this step."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_hessian_diag_sqs, beta2)
    torch._foreach_addcmul_(exp_hessian_diag_sqs, hessians, hessians, 1 - beta2)
    denom = torch._foreach_div(exp_hessian_diag_sqs, [1 - beta2**s for s in steps])
    if hessian_power == 1:
        torch._foreach_sqrt_(denom)
    else:
        torch._foreach_pow_(denom, hessian_power / 2)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1 - beta1**s) for s in steps])


class ForeachAdaHessian(torch.optim.Optimizer):
    """AdaHessian (docs/algorithm.md, section 1) in torch._foreach_* ops, as a user would write it
    without a compiler: z from torch's generator, not the package's pinned sampler;
    n_samples=1; float32/float64 parameters on one device."""

    def __init__(self, params, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, hessian_power=1.0,
                 update_each=1, average_conv_kernel=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power))
        self.update_each = update_each
        self.average_conv_kernel = average_conv_kernel
        self.steps_taken = 0

    @property
    def hessian_due(self) -> bool:
        return self.steps_taken % self.update_each == 0

    @torch.no_grad()
    def step(self):
        hessian_step = self.hessian_due
        self.steps_taken += 1
        estimates = {}
        if hessian_step:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            zs = rademacher_like(params)
            with torch.enable_grad():
                hzs = torch.autograd.grad([p.grad for p in params], params, zs, materialize_grads=True)
            ds = torch._foreach_mul(zs, hzs)
            if self.average_conv_kernel:
                ds = [d.abs().mean((2, 3), keepdim=True).expand_as(d) if d.dim() == 4 else d for d in ds]
            estimates = dict(zip(params, ds))
        for group in self.param_groups:
            lists = [], [], [], [], [], []  # params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, steps
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                d = estimates[p] if hessian_step else state.get("hessian")
                if d is None:
                    continue  # a first gradient on a non-Hessian step waits for a D (docs/algorithm.md, section 1)
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_hessian_diag_sq=torch.zeros_like(p))
                if hessian_step and self.update_each > 1:
                    state["hessian"] = d  # kept for the steps in between
                state["step"] += 1
                for values, x in zip(lists, (p, p.grad, state["exp_avg"], state["exp_hessian_diag_sq"], d, state["step"])):
                    values.append(x)
            if lists[0]:
                beta1, beta2 = group["betas"]
                foreach_adahessian_(
                    *lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
                )


# ---------------------------------------------------------------------- implementations


@dataclass
class Implementation:
    make: Callable[[list[Tensor], int], torch.optim.Optimizer]  # (params, update_each)
    hessian_due: Callable[[torch.optim.Optimizer], bool] | None  # None: first order
    supports_update_each: bool = True


# Every AdaHessian implementation runs the same hyperparameters (hessian_power=1, as the
# original's default). eps=1e-4, not the original's 1e-8: with 1e-8, weights whose first
# Hessian estimate is near zero take huge steps (|p| reaches 10^3 within 150 iterations
# of these workloads), and arithmetic on such weights (saturated softmax, denormals) runs
# at another speed: the timing would depend on the trajectory, not the implementation.
HYPERPARAMETERS = dict(lr=0.1, eps=1e-4, hessian_power=1.0)


def implementations(device: torch.device) -> dict[str, Implementation]:
    def adahessian(backend):
        return Implementation(
            lambda ps, u: AdaHessian(ps, update_each=u, backend=backend, **HYPERPARAMETERS), lambda o: o.hessian_due
        )

    impls = {ADAM: Implementation(lambda ps, u: torch.optim.Adam(ps, lr=1e-3, fused=True), None)}
    if backends.fused_unavailable_reason(device) is None:
        impls["adahessian-fused"] = adahessian("fused")
    impls[REFERENCE] = adahessian("reference")
    impls["adahessian-foreach"] = Implementation(
        lambda ps, u: ForeachAdaHessian(ps, update_each=u, **HYPERPARAMETERS), lambda o: o.hessian_due
    )
    impls.update(pypi_implementations())
    return impls


def pypi_implementations() -> dict[str, Implementation]:
    """The AdaHessian classes of other PyPI packages, timed when installed
    (``pip install torch-optimizer pytorch-optimizer``)."""
    impls = {}
    try:
        import torch_optimizer

        impls["torch-optimizer"] = Implementation(
            lambda ps, u: torch_optimizer.Adahessian(ps, **HYPERPARAMETERS), lambda o: True, supports_update_each=False
        )
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        impls["pytorch-optimizer"] = Implementation(
            lambda ps, u: pytorch_optimizer.AdaHessian(ps, update_period=u, **HYPERPARAMETERS),
            lambda o: o.param_groups[0].get("step", 0) % o.update_period == 0,
        )
    except ImportError:
        pass
    return impls


# ------------------------------------------------------------------ timing and memory


class Clock:
    """Timestamps: perf_counter on the CPU; CUDA events on a GPU, read after a block so
    that timing does not synchronize inside it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e3
        end.synchronize()
        return start.elapsed_time(end)


class Memory:
    """Current and peak memory in MiB. CUDA: the caching allocator's statistics. CPU,
    where torch keeps none: the process's resident set (VmRSS, VmHWM in /proc/self/status);
    each reading first hands glibc's free lists back to the system (malloc_trim), so that
    memory freed earlier neither counts as in use nor hides a new peak, and reset()
    restarts VmHWM from the current resident set (/proc/self/clear_refs). None where
    this is unavailable (not Linux with glibc)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            Path("/proc/self/status").read_text()
        except (OSError, AttributeError):
            self._trim = None
        self.method = (
            "torch.cuda.max_memory_allocated" if self.cuda
            else "process resident set: VmHWM/VmRSS after malloc_trim(0), peak reset via /proc/self/clear_refs"
            if self._trim else "unavailable"
        )

    def reset(self) -> float | None:
        """The memory in use now; the peak restarts from it."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self._trim:
            self._trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        return self.current()

    def current(self) -> float | None:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        if not self._trim:
            return None
        self._trim(0)
        return self._status_mib("VmRSS")

    def peak(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return self._status_mib("VmHWM") if self._trim else None

    @staticmethod
    def _status_mib(field: str) -> float:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1]) / 1024


class Run:
    """One implementation training one workload with one update_each. Blocks of an
    update_each=10 run (and of Adam, for like-sized blocks) are 10 iterations, so each
    holds exactly one Hessian step; blocks of an update_each=1 run are ``steps`` iterations."""

    def __init__(self, work: Workload, impl: Implementation, update_each: int, steps: int, device, clock: Clock,
                 mode: str | None = None):
        torch.manual_seed(0)
        self.work, self.impl, self.update_each, self.clock, self.mode = work, impl, update_each, clock, mode
        self.model = work.model().to(device)
        self.opt = impl.make(list(self.model.parameters()), update_each)
        if mode in DIFFERENCES:
            self.opt.hvp = DIFFERENCES[mode]
        self.first_order = impl.hessian_due is None
        self.calls = UPDATE_EACH if update_each > 1 or self.first_order else steps
        self.iteration_name = (f"iteration-{mode}" if mode else "iteration" if update_each == 1
                               else f"iteration-ue{update_each}")
        self.has_gradients = False
        self.peak_mib = self.growth_mib = self.state_mib = None

    def block(self) -> dict[str, float]:
        """One block of iterations; the mean ms of each measurement it feeds."""
        marks = []
        for _ in range(self.calls):
            start = self.clock.mark()
            hessian = not self.first_order and self.impl.hessian_due(self.opt)
            closure = None
            if self.mode in DIFFERENCES:
                closure = self.closure  # step() evaluates it, on Hessian steps more than once
            elif hessian or self.work.iterations or not self.has_gradients:
                self.opt.zero_grad(set_to_none=True)
                with math_attention():
                    self.backward(hessian)
                self.has_gradients = True
            before_step = self.clock.mark()
            if closure is None:
                self.opt.step()
            else:
                self.opt.step(closure)
            marks.append((start, before_step, self.clock.mark(), hessian))
        iteration = statistics.mean(self.clock.ms(a, c) for a, _, c, _ in marks)
        hessian_steps = [self.clock.ms(b, c) for _, b, c, h in marks if h]
        update_steps = [self.clock.ms(b, c) for _, b, c, h in marks if not h]
        out = {self.iteration_name: iteration} if self.work.iterations else {}
        if self.first_order:
            out["update"] = out["step"] = statistics.mean(update_steps)
        elif self.update_each > 1 or not self.impl.supports_update_each:
            # An update_each=1 run of an implementation that has update_each=10 runs only
            # times iterations: the Hessian step comes from those, like the update.
            out["step"] = statistics.mean(hessian_steps)
            if update_steps:
                out["update"] = statistics.mean(update_steps)
        return out

    def backward(self, hessian: bool) -> None:
        """The iteration's gradients (and, on a Hessian step, what the Hessian needs) by
        the run's mode."""
        loss = self.work.loss
        if self.mode is None:
            loss(self.model).backward(create_graph=hessian)
            return
        k = int(self.mode[-1])
        size = max(1, self.work.batch // k)
        if self.mode.startswith("accum"):
            for i in range(k):
                self.opt.backward(loss(self.model, slice(i * size, (i + 1) * size)) / k)
        else:
            loss(self.model).backward()
            if hessian:
                self.opt.hessian_backward(loss(self.model, slice(0, size)))

    def closure(self) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        with math_attention():  # as for every other row, though these need no double backward
            loss = self.work.loss(self.model)
        loss.backward()
        return loss

    def warm_up(self, memory: Memory) -> None:
        """Three blocks: one to warm up (allocator, lazily built kernels, optimizer state),
        then the peak memory over two more above the memory held before them (model,
        optimizer state), and how much that held memory grew over the last block."""
        self.block()
        base = memory.reset()
        self.block()
        middle = memory.current()
        self.block()
        end, peak = memory.current(), memory.peak()
        if base is not None:
            self.peak_mib, self.growth_mib = peak - base, end - middle
        self.state_mib = sum(
            t.numel() * t.element_size() for s in self.opt.state.values() for t in s.values() if isinstance(t, Tensor)
        ) / 2**20


# -------------------------------------------------------------------------- measuring


def build_runs(args, device, clock) -> dict[tuple[str, str, int, str | None], Run]:
    works = workloads(args.quick, device)
    impls = implementations(device)
    # The modes run on this package's AdaHessian: the fused kernels where available.
    package = "adahessian-fused" if "adahessian-fused" in impls else REFERENCE
    runs = {}
    for w in works if args.workload == "all" else [args.workload]:
        for name, impl in impls.items():
            schedules = [1]
            if impl.hessian_due is not None and impl.supports_update_each:
                schedules = [1, UPDATE_EACH] if works[w].iterations else [UPDATE_EACH]
            for update_each in schedules:
                runs[(w, name, update_each, None)] = Run(works[w], impl, update_each, args.steps, device, clock)
            for mode in MODES if name == package and works[w].iterations else ():
                runs[(w, name, 1, mode)] = Run(works[w], impl, 1, args.steps, device, clock, mode)
    return runs


def measure(args, runs: dict[tuple[str, str, int, str | None], Run], memory: Memory) -> dict[tuple[str, str, str], list[float]]:
    """Warm-up (and memory), then interleaved rounds; per (workload, measurement,
    implementation) the mean ms per call of each round."""
    for run in tqdm(runs.values(), desc="warm-up", disable=args.quiet):
        run.warm_up(memory)
    samples: dict[tuple[str, str, str], list[float]] = {}
    items = list(runs.items())
    with tqdm(total=args.rounds * len(items), desc="rounds", disable=args.quiet) as bar:
        for r in range(args.rounds):
            for (w, name, _, _), run in items[r % len(items):] + items[: r % len(items)]:
                for measurement, ms in run.block().items():
                    samples.setdefault((w, measurement, name), []).append(ms)
                bar.update()
    return samples


def summarize(samples, runs) -> list[dict]:
    medians = {key: statistics.median(ms) for key, ms in samples.items()}
    # Memory belongs to the iteration rows, from the run that timed them.
    memory = {(w, run.iteration_name, name): run for (w, name, _, _), run in runs.items()}
    works = list(dict.fromkeys(w for w, _, _, _ in runs))
    impls = list(dict.fromkeys(name for _, name, _, _ in runs))
    rows = []
    for key in sorted(samples, key=lambda k: (works.index(k[0]), MEASUREMENTS.index(k[1]), impls.index(k[2]))):
        w, measurement, name = key
        p25, _, p75 = quartiles(samples[key])
        # A mode's rows compare with the classic iteration (Adam has neither modes nor update_each).
        classic = "iteration" if measurement.startswith("iteration") else measurement
        reference = medians.get((w, measurement, REFERENCE)) or medians.get((w, classic, REFERENCE))
        adam = medians.get((w, classic, ADAM))
        run = memory.get(key)
        rows.append(dict(
            workload=w, measurement=measurement, impl=name, median_ms=medians[key], p25_ms=p25, p75_ms=p75,
            vs_reference=medians[key] / reference if reference else None,
            vs_adam=medians[key] / adam if adam else None,
            state_mib=run and run.state_mib, peak_mib=run and run.peak_mib, growth_mib=run and run.growth_mib,
        ))
    return rows


# ----------------------------------------------------------------------------- output


def _fmt(value, spec):
    if value is None:
        return "-"
    text = format(value, spec)
    return text.replace("-", "+") if float(text) == 0 else text  # a growth of -0.01 MiB is +0.0


def print_table(rows):
    header = f"{'workload':<12}{'measurement':<22}{'implementation':<22}{'ms':>9}{'p25..p75':>17}{'x ref':>7}{'x Adam':>8}{'state MiB':>10}{'peak MiB':>10}{'growth MiB':>11}"
    print("\n" + header)
    previous = None
    for r in rows:
        if previous and previous != (r["workload"], r["measurement"]):
            print()
        previous = (r["workload"], r["measurement"])
        spread = f"{r['p25_ms']:.2f}..{r['p75_ms']:.2f}"
        print(
            f"{r['workload']:<12}{r['measurement']:<22}{r['impl']:<22}{r['median_ms']:>9.2f}{spread:>17}"
            f"{_fmt(r['vs_reference'], '.2f'):>7}{_fmt(r['vs_adam'], '.2f'):>8}"
            f"{_fmt(r['state_mib'], '.1f'):>10}{_fmt(r['peak_mib'], '.1f'):>10}{_fmt(r['growth_mib'], '+.1f'):>11}"
        )
    print(
        "\nms: per call, median over rounds. state: the optimizer's state tensors. peak: the most memory an\n"
        "iteration adds above what is held between iterations. growth: how much that held memory grew over\n"
        f"the last warm-up block ({UPDATE_EACH} iterations; update_each=1 runs: --steps)."
    )


def write_csv(rows, path: Path):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows) -> str:
    """The same numbers pivoted for a README: a line per (workload, measurement), a column
    per implementation; then the memory of the iteration lines."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["measurement"]), {})[r["impl"]] = r

    def table(cell, measurements=MEASUREMENTS):
        lines = ["| workload | measurement | " + " | ".join(impls) + " |", "| :-- | :-- |" + " --: |" * len(impls)]
        for (w, m), cells in groups.items():
            if m in measurements:
                lines.append(f"| {w} | {m} | " + " | ".join(cell(cells[i]) if i in cells else "" for i in impls) + " |")
        return "\n".join(lines)

    def timing(r):
        return f"{r['median_ms']:.2f} ms" + ("" if r["impl"] == ADAM else f" ({r['vs_adam']:.2f}x)")

    def memory(r):
        return "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f} ({_fmt(r['growth_mib'], '+.1f')})"

    return (
        "Median ms per call (ratio to Adam):\n\n" + table(timing) + "\n\nPeak MiB an iteration adds above what is "
        "held between iterations (growth over the last warm-up block):\n\n"
        + table(memory, MEASUREMENTS[2:]) + "\n"
    )


def plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(len(works), len(MEASUREMENTS), figsize=(4.4 * len(MEASUREMENTS), 2.7 * len(works)), squeeze=False)
    for ax, (w, measurement) in zip(axes.flat, ((w, m) for w in works for m in MEASUREMENTS)):
        group = [r for r in rows if r["workload"] == w and r["measurement"] == measurement]
        if not group:
            ax.axis("off")
            continue
        if measurement.startswith("iteration-"):  # show the Adam iteration its ratios are against
            group = [r for r in rows if (r["workload"], r["measurement"], r["impl"]) == (w, "iteration", ADAM)] + group
        y = range(len(group))
        medians = [r["median_ms"] for r in group]
        spread = [[m - r["p25_ms"] for m, r in zip(medians, group)], [r["p75_ms"] - m for m, r in zip(medians, group)]]
        ax.barh(y, medians, xerr=spread, color=["#999999" if r["impl"] == ADAM else "#3b75af" for r in group])
        ax.set_yticks(list(y), [r["impl"] for r in group], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{w}: {measurement}", fontsize=9)
        ax.set_xlabel("ms per call (median, p25..p75)", fontsize=8)
        for k, r in enumerate(group):
            ax.text(r["p75_ms"], k, f" {r['vs_adam']:.2f}x Adam", va="center", fontsize=7)
        ax.set_xlim(0, max(r["p75_ms"] for r in group) * 1.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all", choices=["all", "cnn", "transformer", "many-small"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (CUDA events, allocator peak memory)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=None,
                        help="iterations per block of an update_each=1 run (update_each=10 runs and Adam: 10)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for results.json/.csv/.md/.png")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts: a smoke run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 15)
    args.steps = args.steps or (1 if args.quick else 2)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    load_before = os.getloadavg()
    started = time.perf_counter()
    clock, memory = Clock(device), Memory(device)
    runs = build_runs(args, device, clock)
    samples = measure(args, runs, memory)
    rows = summarize(samples, runs)
    print_table(rows)

    result = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu=_cpu_name(),
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        seconds=round(time.perf_counter() - started, 1),
        command=" ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        rounds=args.rounds,
        steps_per_block=args.steps,
        update_each=UPDATE_EACH,
        memory_method=memory.method,
        rows=rows,
        samples_ms={f"{w}/{m}/{i}": s for (w, m, i), s in samples.items()},
    )
    write_results(args.out, "results", result, markdown(rows))
    write_csv(rows, args.out / "results.csv")
    plot(rows, args.out / "results.png", f"AdaHessian vs Adam: {result['device']} ({result['cpu']}), torch threads: {result['threads']}, torch {result['torch']}")
    print(f"\nload average {load_before[0]:.2f} -> {result['load_average_after'][0]:.2f}; "
          f"{result['seconds']:.0f} s; wrote {args.out}/results.{{json,csv,md,png}}")
    return result


def _cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
