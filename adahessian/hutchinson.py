"""The Hutchinson estimate ``D = E[z * Hz]`` of the Hessian diagonal (docs/algorithm.md,
section 1, step 1): Rademacher vectors from the pinned sampler, Hessian-vector products
from the gradients' graph, one ``torch.autograd.grad`` call per sample over all
parameters, on every backend; summed over several losses for ``AdaHessian.backward``
and ``hessian_backward`` (:class:`Accumulated`). Also the record that tells a missing
``create_graph=True`` (the user's to fix) from a gradient that has no graph although one
was asked for, and autograd's failure modes turned into errors that say what to do.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import amp, distributed, functional, sampler
from .precision import state_dtype

NO_GRAPH_MESSAGE = (
    "AdaHessian needs the graph of the gradients to compute Hessian-vector products, but "
    "the gradients were computed without one: call loss.backward(create_graph=True) before "
    "optimizer.step() (or loss.backward(create_graph=optimizer.hessian_due) to pay for it "
    "only on the steps that recompute the Hessian; read hessian_due after changing "
    "update_each, n_samples or a spatial-averaging setting, since a change makes the next step a "
    "Hessian step), or optimizer.backward(loss) in place of loss.backward(), which does "
    "that and frees the graph at once."
)

SDPA_MESSAGE = (
    "AdaHessian could not differentiate the gradients a second time: PyTorch's fused "
    "scaled-dot-product-attention kernels (flash / memory-efficient / cuDNN, used by "
    "nn.TransformerEncoderLayer and F.scaled_dot_product_attention) have no double "
    "backward. Run the forward pass under the math kernel: "
    "`with adahessian.math_attention(): loss = loss_fn(model(x), y)` (the same as "
    "`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`), or keep the fused kernels with "
    "AdaHessian(..., hvp='finite_difference'), which needs no double backward."
)


class Estimate(NamedTuple):
    """A Hessian step's Hutchinson data, aligned with the step's parameter list: the
    last sample's z (the parameters' dtype), its sampler keys and Hz (unscaled), and the
    sum of ``z * Hz`` over the earlier samples (the state dtype; None when
    ``n_samples == 1``). A finite difference (README, "Without double backward") leaves
    Hz unformed: ``hzs`` are then the gradients at theta + eps z, ``bases`` those at
    theta (or theta - eps z) and ``Hz = (hzs - bases) * inv_step``, which the kernels
    form as they read them (None and 1.0: ``hzs`` are Hz)."""

    zs: list[Tensor]
    keys: list[int]
    hzs: list[Tensor]
    partial_sums: list[Tensor] | None
    bases: list[Tensor] | None = None
    inv_step: float = 1.0

    def select(self, ns: list[int]) -> Estimate:
        """The estimate of the parameters at positions ``ns``."""
        pick = [self.zs, self.keys, self.hzs, self.partial_sums, self.bases]
        return Estimate(*(None if xs is None else [xs[n] for n in ns] for xs in pick), self.inv_step)

    def tensors(self) -> list[Tensor]:
        """The tensors that distributed training averages across ranks (the bases too:
        the average of the differences is the difference of the averages)."""
        return self.hzs + (self.bases or []) + (self.partial_sums or [])


class GraphRecord:
    """Whether each watched parameter's gradient was last accumulated by a backward with
    ``create_graph=True`` (grad mode is on in the backward pass exactly then), recorded
    by a post-accumulate-grad hook, and which parameters were warned about."""

    def __init__(self) -> None:
        self.create_graph: dict[int, bool] = {}
        self.warned: set[int] = set()
        self.walked = False
        self._handles: list = []

    def watch(self, index: int, param: Tensor) -> None:
        if param.requires_grad and param.is_leaf:
            hook = functools.partial(_record, self.create_graph, index)
            self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def bind(self, owner: object) -> None:
        """Remove the hooks when ``owner`` (the optimizer) is garbage-collected."""
        weakref.finalize(owner, _remove, self._handles)

    def seen(self, index: int) -> bool:
        return index in self.create_graph

    def check(self, indices: list[int], params: list[Tensor], grads: list[Tensor | None], *, any_graph: bool) -> None:
        """The rule for gradients without a graph on a Hessian step (README, "Gradients
        without a graph"): after a backward without ``create_graph`` it is the user's to
        fix (RuntimeError); after one with it, the Hessian rows are zero (D = 0: see
        :meth:`warn_without_graph`). Where no hook saw the gradient arrive (set by hand),
        a step with no graph at all is taken for the former."""
        for idx, p, grad in zip(indices, params, grads):
            if grad is None or has_graph(grad) or p.numel() == 0:
                continue
            created = self.create_graph.get(idx)
            if created is False or (created is None and not any_graph):
                raise RuntimeError(NO_GRAPH_MESSAGE + distributed.ddp_hint())

    def warn_without_graph(self, pairs: list[tuple[int, Tensor]]) -> None:
        """One warning naming the possible causes for the (flat index, parameter) pairs
        whose gradient came from a ``create_graph`` backward without a graph, once per
        parameter."""
        self._warn_once(pairs, _no_graph_warning)

    def warn_unreached(self, pairs: list[tuple[int, Tensor]]) -> None:
        """The same for parameters that have a gradient but that no loss given to
        ``AdaHessian.backward`` / ``hessian_backward`` reached."""
        self._warn_once(pairs, _unreached_warning)

    def walk_once(self, grads: list[Tensor]) -> None:
        """Warn if the gradients' graph passes a part without double backward; once
        (the walk visits the whole graph)."""
        if grads and not self.walked:
            self.walked = True
            if _passes_once_differentiable(grads):
                warnings.warn(ONCE_DIFFERENTIABLE_WARNING, stacklevel=5)

    def _warn_once(self, pairs: list[tuple[int, Tensor]], message: Callable[[str], str]) -> None:
        new = [(idx, p) for idx, p in pairs if idx not in self.warned and p.numel()]
        if new:
            self.warned.update(idx for idx, _ in new)
            warnings.warn(message(", ".join(str(tuple(p.shape)) for _, p in new)), stacklevel=6)


class Accumulated:
    """Hessian-vector products summed over the losses of one step, per flat parameter
    index (the sampler's ``param_index``): the last sample's z and Hz (the parameters'
    dtype; from a finite difference its two gradients in ``hzs`` and ``bases`` and the
    scalar ``inv_step``, as in :class:`Estimate`) and the sum of ``z * Hz`` over the
    earlier samples (the state dtype). Raw: Hz
    carries the loss scale S of a scaled loss and the factor ``factor`` (c) on z. Hz is
    linear in the loss, so summing the products of several losses gives the product of
    their sum (README, "Gradient accumulation and a sub-batch Hessian"). ``reached``:
    the parameters some loss had a gradient for. ``floor``: the relative floor of
    :func:`floor_` that a sub-batch estimate asks for (0: none)."""

    def __init__(self, *, step: int, counter: int, n_samples: int, seed: int, factor: float) -> None:
        self.step, self.counter, self.n_samples, self.seed, self.factor = step, counter, n_samples, seed, factor
        self.floor = 0.0
        self.zs: dict[int, Tensor] = {}
        self.hzs: dict[int, Tensor] = {}
        self.bases: dict[int, Tensor] = {}
        self.inv_step = 1.0
        self.partial_sums: dict[int, Tensor] = {}
        self.reached: set[int] = set()

    def belongs_to(self, step: int, counter: int, n_samples: int, seed: int) -> bool:
        """Were these products made for the step ``step`` with these z?"""
        return (self.step, self.counter, self.n_samples, self.seed) == (step, counter, n_samples, seed)


def accumulate_(
    acc: Accumulated,
    grads: list[Tensor | None],
    params: list[Tensor],
    indices: list[int],
    *,
    seed: int,
    backend_for: Callable[[torch.device], str],
    record: GraphRecord,
    retain_graph: bool,
) -> None:
    """Add to ``acc`` the Hessian-vector products of the graph of ``grads`` (the
    gradients of ``params``, None where a loss does not reach one; ``indices``: their
    flat positions), sample ``s`` with z drawn at sampler counter ``acc.counter + s``.
    The graph is freed after the last sample unless ``retain_graph``. Gradients without
    a graph get zero Hessian rows (one warning per parameter, ``record``). RuntimeError
    naming the fix when the graph holds fused attention."""
    reached = [n for n, grad in enumerate(grads) if grad is not None]
    acc.reached.update(indices[n] for n in reached)
    graph = [n for n in reached if has_graph(grads[n])]
    record.warn_without_graph([(indices[n], params[n]) for n in reached if not has_graph(grads[n])])
    record.walk_once([grads[n] for n in graph])
    if not graph:
        return
    params, indices = [params[n] for n in graph], [indices[n] for n in graph]
    for s in range(acc.n_samples):
        keys = [sampler.rademacher_key(seed, idx, acc.counter + s) for idx in indices]
        zs = sample(params, keys, backend_for)
        outputs = zs if acc.factor == 1.0 else torch._foreach_mul(zs, acc.factor)
        hzs = hessian_vector_products(
            [grads[n] for n in graph], params, outputs, retain_graph=retain_graph or s < acc.n_samples - 1
        )
        add_sample_(acc, s, params, indices, keys, zs, hzs, backend_for=backend_for)


def add_sample_(
    acc: Accumulated, s: int, params: list[Tensor], indices: list[int], keys: list[int], zs: list[Tensor],
    hzs: list[Tensor], *, bases: list[Tensor] | None = None, inv_step: float = 1.0,
    backend_for: Callable[[torch.device], str],
) -> None:
    """Add sample ``s``'s products ``hzs`` (of ``params`` at flat ``indices``, with z
    ``zs`` drawn with sampler ``keys``; with ``bases``, the finite difference
    ``(hzs - bases) * inv_step``) to ``acc``: the last sample's Hz is summed as it is
    (a finite difference's operands kept, one per step), the earlier samples' ``z * Hz``
    into the partial sums."""
    if s == acc.n_samples - 1:
        for n, (idx, z, hz) in enumerate(zip(indices, zs, hzs)):
            acc.zs[idx] = z
            if bases is not None:
                assert idx not in acc.hzs, "a finite difference is taken once per step"
                acc.hzs[idx], acc.bases[idx], acc.inv_step = hz, bases[n], inv_step
            else:
                acc.hzs[idx] = hz if idx not in acc.hzs else acc.hzs[idx].add_(hz)
        return
    sums = [acc.partial_sums.setdefault(idx, torch.zeros_like(p, dtype=state_dtype(p))) for idx, p in zip(indices, params)]
    for ns in by_device(params).values():
        functional.accumulate_hessian_(
            [sums[n] for n in ns], [zs[n] for n in ns], [hzs[n] for n in ns], keys=[keys[n] for n in ns],
            bases=None if bases is None else [bases[n] for n in ns], inv_step=inv_step,
            backend=backend_for(params[ns[0]].device),
        )


def estimate(
    params: list[Tensor],
    grads: list[Tensor | None],
    indices: list[int],
    *,
    accumulated: Accumulated | None,
    seed: int,
    counter: int,
    n_samples: int,
    backend_for: Callable[[torch.device], str],
    record: GraphRecord,
    loss_scale: amp.LossScale,
    hessian_scale: amp.HessianScale,
) -> tuple[Estimate, amp.Overflow | None]:
    """The Hutchinson estimate for ``params`` (their gradients ``grads``, None where a
    rank has none; ``indices``: their positions in the optimizer's flat parameter list,
    the sampler's ``param_index``), with sample ``s`` drawn at sampler counter
    ``counter + s``: from ``accumulated`` (``AdaHessian.backward`` /
    ``hessian_backward``) when given, else from the graph the gradients carry. Under a
    loss scale, Hz is unscaled and checked (one host read per try); on overflow the
    gradients' graph is retried with a lower factor c, while accumulated products,
    whose graphs are gone, skip the step and lower c for the next one. The second
    result says whether the step overflowed (None without a scale). Raises RuntimeError
    when the gradients have no graph (``record.check``) or the graph has no double
    backward (fused attention)."""
    if accumulated is not None:
        record.warn_unreached([(idx, p) for idx, p, grad in zip(indices, params, grads)
                               if grad is not None and p.numel() and idx not in accumulated.reached])
        result, overflow = _finish(accumulated, params, indices, seed=seed, backend_for=backend_for, loss_scale=loss_scale)
        if overflow is amp.Overflow.HESSIAN:
            hessian_scale.back_off()
    else:
        record.check(indices, params, grads, any_graph=any(g is not None and has_graph(g) for g in grads))
        retries = 0
        while True:
            acc = Accumulated(step=0, counter=counter, n_samples=n_samples, seed=seed, factor=hessian_scale.scale)
            # Under a loss scale the graph is kept for retries (step() frees it).
            accumulate_(acc, grads, params, indices, seed=seed, backend_for=backend_for, record=record,
                        retain_graph=loss_scale.scale is not None)
            result, overflow = _finish(acc, params, indices, seed=seed, backend_for=backend_for, loss_scale=loss_scale)
            if overflow is not amp.Overflow.HESSIAN or retries == hessian_scale.RETRIES or not hessian_scale.back_off():
                break
            retries += 1
    if overflow is not None and overflow is not amp.Overflow.GRADIENTS:
        hessian_scale.finished(ok=overflow is amp.Overflow.NONE)
    return result, overflow


def floor_(estimate: Estimate, floor: float, n_samples: int) -> None:
    """Raise each |D| below ``floor`` times its tensor's mean |D| to that value, sign
    kept (zeros become positive), in place: Hz is rewritten so that the step's
    ``D = (partial_sums + z * Hz) / n_samples`` is the floored one (z * z = 1). For a
    sub-batch Hessian: in a piecewise-linear model (ReLU, max-pool) a weight whose unit
    is inactive on every sample of the sub-batch has D = 0 exactly while the full
    batch's gradient is not zero, and its update ``lr * m / (|D| + eps)`` explodes
    (README, "Gradient accumulation and a sub-batch Hessian"). Only hessian_backward
    asks for it, which a finite difference refuses: ``estimate`` holds Hz itself."""
    assert estimate.bases is None, "a finite-difference estimate is never floored"
    for i, (z, hz) in enumerate(zip(estimate.zs, estimate.hzs)):
        partial = None if estimate.partial_sums is None else estimate.partial_sums[i]
        dtype = state_dtype(hz)
        total = z.to(dtype) * hz.to(dtype)  # n_samples * D
        if partial is not None:
            total = total + partial
        magnitude = total.abs()
        low = floor * magnitude.mean()
        raised = torch.where(magnitude < low, torch.copysign(low, total), total)
        if partial is not None:
            raised = raised - partial
        hz.copy_(z.to(dtype) * raised)


def _finish(
    acc: Accumulated, params: list[Tensor], indices: list[int], *, seed: int,
    backend_for: Callable[[torch.device], str], loss_scale: amp.LossScale,
) -> tuple[Estimate, amp.Overflow | None]:
    """``acc`` as the Estimate of ``params`` (zero Hessian rows where it holds no
    product), Hz unscaled by ``S * c`` and checked under a loss scale (never a finite
    difference's: the optimizer refuses a GradScaler with one)."""
    keys = [sampler.rademacher_key(seed, idx, acc.counter + acc.n_samples - 1) for idx in indices]
    missing = [n for n, idx in enumerate(indices) if idx not in acc.zs]
    sampled = dict(zip(missing, sample([params[n] for n in missing], [keys[n] for n in missing], backend_for)))
    zs = [sampled[n] if n in sampled else acc.zs[idx] for n, idx in enumerate(indices)]
    hzs = [acc.hzs[idx] if idx in acc.hzs else torch.zeros_like(p) for idx, p in zip(indices, params)]
    bases = None
    if acc.bases:
        assert loss_scale.scale is None, "a finite difference is never loss-scaled"
        bases = [acc.bases[idx] if idx in acc.bases else torch.zeros_like(p) for idx, p in zip(indices, params)]
    partial_sums = None
    if acc.n_samples > 1:
        partial_sums = [acc.partial_sums[idx] if idx in acc.partial_sums else torch.zeros_like(p, dtype=state_dtype(p))
                        for idx, p in zip(indices, params)]
    overflow = None
    if loss_scale.scale is not None:
        overflow = amp.unscale_and_check_(hzs + (partial_sums or []), loss_scale.scale * acc.factor, loss_scale.found_inf)
    return Estimate(zs, keys, hzs, partial_sums, bases, acc.inv_step), overflow


def sample(params: list[Tensor], keys: list[int], backend_for: Callable[[torch.device], str]) -> list[Tensor]:
    """z for each of ``params`` (its sampler key in ``keys``), one call per device."""
    zs: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for device_ns in by_device(params).values():
        device = params[device_ns[0]].device
        sampled = functional.sample_rademacher([params[n] for n in device_ns], [keys[n] for n in device_ns],
                                               backend=backend_for(device))
        for n, z in zip(device_ns, sampled):
            zs[n] = z
    return zs


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[int]]:
    """Positions of ``tensors`` by device."""
    groups: dict[torch.device, list[int]] = {}
    for n, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(n)
    return groups


def has_graph(grad: Tensor) -> bool:
    """Was this gradient built with ``create_graph=True`` from something differentiable?"""
    return grad.requires_grad


def hessian_vector_products(
    grads: list[Tensor], params: list[Tensor], vectors: list[Tensor], *, retain_graph: bool
) -> list[Tensor]:
    """``H z`` for every parameter (its shape and dtype), from one autograd call over the
    gradients' graph. A parameter that the graph does not reach gets zeros (its Hessian
    rows are zero). RuntimeError naming the fix when fused attention is in the graph."""
    try:
        with torch.enable_grad():
            hvps = torch.autograd.grad(
                grads, params, grad_outputs=vectors, retain_graph=retain_graph, allow_unused=True
            )
    except RuntimeError as err:
        if "_scaled_dot_product" in str(err) or "_efficient_attention" in str(err) or "_flash_attention" in str(err):
            raise RuntimeError(SDPA_MESSAGE) from err
        raise
    return [torch.zeros_like(p) if h is None else h for h, p in zip(hvps, params)]


ONCE_DIFFERENTIABLE_WARNING = (
    "AdaHessian: the gradients' graph passes through a part of the model without double "
    "backward (a custom torch.autograd.Function whose backward is marked "
    "@once_differentiable, or a fused kernel like it): the Hessian-vector products leave "
    "out every term that flows through it, so D is wrong for the parameters before it. "
    "Use ops with a double backward there (write the backward with differentiable torch "
    "ops, or use the plain PyTorch version of the op) for the Hessian steps."
)


def _passes_once_differentiable(grads: list[Tensor]) -> bool:
    """Does the graph of ``grads`` hold the node that ``@once_differentiable`` puts in
    place of a backward's own graph (it raises only if autograd reaches it, which a
    Hessian-vector product that flows around it never does)?"""
    seen, stack = set(), [g.grad_fn for g in grads]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if isinstance(node, torch._C._functions.Error):
            return True
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _no_graph_warning(shapes: str) -> str:
    return (
        f"AdaHessian: backward ran with create_graph=True, but the gradient of the "
        f"parameter(s) of shape {shapes} has no autograd graph, so their Hessian rows are "
        "taken as zero (D = 0; their update divides by eps alone). Possible causes: the loss "
        "is linear in them (then D = 0 is exact); a custom torch.autograd.Function or fused "
        "kernel without double backward (e.g. a backward marked @once_differentiable) on "
        "the path from them to the loss; .detach() or torch.no_grad() inside the model."
    )


def _unreached_warning(shapes: str) -> str:
    return (
        f"AdaHessian: no loss given to optimizer.backward() or optimizer.hessian_backward() "
        f"in this step reached the parameter(s) of shape {shapes}, which have a gradient: "
        "their Hessian rows are taken as zero (D = 0; their update divides by eps alone). "
        "Give hessian_backward a loss that depends on every trained parameter (a sub-batch "
        "that exercises the same parts of the model as the full batch)."
    )


def _record(modes: dict[int, bool], index: int, _param: Tensor) -> None:
    modes[index] = torch.is_grad_enabled()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
