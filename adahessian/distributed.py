"""Where the optimizer's work is distributed, chosen once from ``process_group``
(:func:`distributor_for`): a single process (:class:`SingleProcess`) or data
parallelism on a ``torch.distributed`` process group (:class:`DataParallel`), which
averages gradients and Hessian-vector products across ranks in a few flat buckets.

Every rank draws the same z (the sampler is counter-based), so averaging the ranks'
``Hz`` gives ``H z`` of the global loss, and ``z * mean(Hz) == mean(z * Hz)`` exactly
(z is +-1). Averaging Hz rather than ``z * Hz`` lets the fused kernels still
regenerate z instead of reading it.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.profiler import record_function

from ._warnings import warn

# Elements per all-reduce: large enough that latency is paid a few times per step,
# small enough that a flattened copy never needs one contiguous multi-GB block.
BUCKET_ELEMENTS = 64 * 1024 * 1024
# The profiler range (torch.profiler) around the whole all-reduce (bucketing, flatten,
# collectives, copy back): a few microseconds once per step, against the milliseconds
# of the collectives.
ALL_REDUCE_RANGE = "adahessian.all_reduce_mean_"

WORLD = "world"
# What a copy (deepcopy, pickle) of an optimizer holds instead of a ProcessGroup object,
# which cannot be copied.
NOT_COPIED = "<a ProcessGroup object, not copied>"


class StepLists(NamedTuple):
    """What a step updates, aligned: (param group index, flat parameter index,
    parameter) entries, their gradients (None where this rank has none) and the Hessian
    step's estimate (:class:`adahessian.functional.Estimate`, or None)."""

    entries: list[tuple[int, int, Tensor]]
    grads: list[Tensor | None]
    estimate: object

    def estimate_tensors(self) -> list[Tensor]:
        return [] if self.estimate is None else self.estimate.tensors()

    def select(self, ns: list[int]) -> StepLists:
        return StepLists([self.entries[n] for n in ns], [self.grads[n] for n in ns],
                         None if self.estimate is None else self.estimate.select(ns))


class SingleProcess:
    """Each process steps on its own gradients."""

    communicates = False
    every_trainable = False  # the step takes the parameters that have a gradient

    def check(self, fingerprint: dict[str, int], device: torch.device) -> None:
        """Warn when torch.distributed runs several ranks that would drift apart."""
        warn_if_ranks_would_diverge()

    def average_(self, lists: StepLists) -> StepLists:
        return lists


class DataParallel:
    """Every rank of ``group`` draws the same z and steps on the ranks' average gradient
    and Hz. ``last_average_seconds``: the wall time of the last step's averaging (the
    collectives included), the seam benchmarks time it through."""

    communicates = True
    # All ranks must lay out their buckets alike: every parameter that requires grad
    # takes part (None where this rank has no gradient).
    every_trainable = True

    def __init__(self, group) -> None:
        self.group = group
        self.last_average_seconds = 0.0

    def check(self, fingerprint: dict[str, int], device: torch.device) -> None:
        check_same_everywhere(self.group, fingerprint, device)

    def average_(self, lists: StepLists) -> StepLists:
        """Average the gradients and the estimate's tensors in place; the parameters no
        rank had a gradient for drop out of the lists."""
        start = time.perf_counter()
        params = [p for _, _, p in lists.entries]
        grads, keep = average_(self.group, params, lists.grads, lists.estimate_tensors())
        self.last_average_seconds = time.perf_counter() - start
        return StepLists(lists.entries, grads, lists.estimate).select(keep)


def distributor_for(process_group, draw, update_each: int, params: list[Tensor]) -> SingleProcess | DataParallel:
    """The distributor of the ``process_group`` setting (None, "world" or a group),
    checked: the ranks must agree on the step's ``draw``
    (:class:`adahessian.accumulation.Draw`), ``update_each`` and the number of
    parameters (RuntimeError otherwise), and a job of several ranks without a group is
    warned about."""
    group = resolve_group(process_group)
    distributor = SingleProcess() if group is None else DataParallel(group)
    distributor.check(fingerprint(draw, update_each, len(params)), params[0].device)
    return distributor


def fingerprint(draw, update_each: int, n_params: int) -> dict[str, int]:
    """What every rank must agree on, for :meth:`DataParallel.check`."""
    return {
        "seed": draw.seed,
        "step counter": draw.optimizer_step,
        "Rademacher counter": draw.counter,
        "update_each": update_each,
        "n_samples": draw.n_samples,
        "number of parameters": n_params,
    }


def picklable(process_group):
    """``process_group`` as a copy of the optimizer keeps it."""
    return process_group if process_group is None or process_group == WORLD else NOT_COPIED


def resolve_group(process_group):
    """The process group to average over, or None for single-process training."""
    if process_group is None:
        return None
    if process_group == NOT_COPIED:
        raise RuntimeError(
            "AdaHessian: this optimizer is a copy (deepcopy or pickle) of one that was given a "
            "ProcessGroup object, which cannot be copied: set optimizer.process_group = group "
            "again before its first step."
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "AdaHessian(process_group=...) needs torch.distributed to be initialised: call "
            "torch.distributed.init_process_group() (torchrun sets up its environment) first."
        )
    return dist.group.WORLD if process_group == WORLD else process_group


def warn_if_ranks_would_diverge() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warn(
            f"AdaHessian: torch.distributed runs {dist.get_world_size()} ranks but the optimizer "
            "was given no process_group, so each rank steps on its own gradients and the ranks' "
            "parameters drift apart. Pass AdaHessian(..., process_group='world') (and do not wrap "
            "the model in DistributedDataParallel, which has no double backward)."
        )


def check_same_everywhere(group, values: dict[str, int], device: torch.device) -> None:
    """Raise unless every rank holds the same ``values`` (seed, counters, ...): ranks
    that disagree would draw different z and silently average unrelated estimates."""
    t = torch.tensor(list(values.values()), dtype=torch.int64, device=device)
    both = torch.cat([t, -t])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(t)], -both[len(t) :]
    differ = [name for name, h, l in zip(values, high.tolist(), low.tolist()) if h != l]
    if differ:
        raise RuntimeError(
            f"AdaHessian: the ranks disagree on {', '.join(differ)}; every rank must build the "
            "optimizer with the same arguments (seed included) and load the same state_dict."
        )


def average_(group, params: list[Tensor], grads: list[Tensor | None], extra: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Average the gradients of ``params`` (None where this rank has none) and the
    ``extra`` tensors (Hz, partial sums) across the ranks of ``group``, in place, in one
    bucketed all-reduce with a presence flag per parameter riding along. Returns the
    gradients (a rank without one gets the average, set as ``p.grad``: every rank leaves
    with the same gradients) and the positions of the parameters some rank had a
    gradient for (the others drop out of the step). Everything must be unscaled already:
    ranks' loss scales may differ."""
    present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=params[0].device)
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
    all_reduce_mean_(grads + extra + [present], group)
    keep = [n for n, flag in enumerate(present.tolist()) if flag > 0]
    for n in keep:  # grads[n] shares p.grad's storage, so p.grad holds the average
        if params[n].grad is None:
            params[n].grad = grads[n]
    return grads, keep


def all_reduce_mean_(tensors: list[Tensor], group) -> None:
    """Average ``tensors`` across the ranks of ``group``, in place, with one collective
    per bucket of same-device, same-dtype tensors (issued together, then awaited)."""
    with record_function(ALL_REDUCE_RANGE):
        world = dist.get_world_size(group)
        # NCCL averages in the collective; gloo has no AVG: sum, then divide.
        op = dist.ReduceOp.AVG if dist.get_backend(group) == "nccl" else dist.ReduceOp.SUM
        buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
        filled: dict[tuple[torch.device, torch.dtype], int] = {}  # elements in each chain's last bucket
        for t in tensors:
            key = (t.device, t.dtype)
            chain = buckets.setdefault(key, [[]])
            if chain[-1] and filled[key] + t.numel() > BUCKET_ELEMENTS:
                chain.append([])
                filled[key] = 0
            chain[-1].append(t)
            filled[key] = filled.get(key, 0) + t.numel()
        pending = []
        for chain in buckets.values():
            for members in chain:
                flat = _flatten_dense_tensors(members)
                pending.append((flat, members, dist.all_reduce(flat, op=op, group=group, async_op=True)))
        for flat, members, work in pending:
            work.wait()
            if op == dist.ReduceOp.SUM:
                flat.div_(world)
            for t, reduced in zip(members, _unflatten_dense_tensors(flat, members)):
                t.copy_(reduced)


def ddp_hint() -> str:
    """Extra advice for the no-graph error when a multi-rank job is running: the
    usual cause there is a DistributedDataParallel wrapper."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ""
    return (
        " In a distributed job the usual cause is DistributedDataParallel: it has no double "
        "backward (its reduced gradients carry no graph). Train the unwrapped model and pass "
        "AdaHessian(..., process_group='world'), which averages gradients and Hessian "
        "estimates across ranks itself."
    )
