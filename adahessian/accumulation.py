"""Hessian-vector products summed over the losses of one step (:class:`Accumulated`), and
the protocol that fills it: ``AdaHessian.backward`` / ``hessian_backward``
(:class:`Accumulator`), the samples of a gradient graph (:func:`accumulate_`) or of a
finite difference (:func:`add_sample_`), and the step's :class:`~.functional.Estimate`
made from the sum (:func:`finish`, :func:`floor_`).

Hz is linear in the loss, so summing the products of several losses gives the product
of their sum (README, "Gradient accumulation and a sub-batch Hessian").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import amp, functional, graphs, sampler
from .devices import by_device
from .functional import Difference, Estimate
from .precision import state_dtype

# hessian_backward's default floor on |D|, relative to its tensor's mean |D|.
SUB_BATCH_FLOOR = 0.1


class Draw(NamedTuple):
    """What one optimizer step's z depend on: the step's number (``optimizer_step``), the sampler's
    counter before it, ``n_samples`` and the seed. Sample ``s`` of the parameter at flat
    index ``idx`` has the sampler key ``rademacher_key(seed, idx, counter + s)``."""

    optimizer_step: int
    counter: int
    n_samples: int
    seed: int

    def keys(self, indices: list[int], s: int) -> list[int]:
        return [sampler.rademacher_key(self.seed, idx, self.counter + s) for idx in indices]


class Accumulated:
    """Hessian-vector products summed over the losses of one step (``draw``), per flat
    parameter index (the sampler's ``param_index``): the last sample's z and Hz (the
    parameters' dtype; from a finite difference its two gradients ``ahead``/``behind`` and
    ``inv_eps``, as in :class:`~.functional.Difference`) and the sum of ``z * Hz`` over
    the earlier samples (the state dtype). Raw: Hz carries the loss scale S of a scaled
    loss and the factor ``factor`` (c) on z. ``reached``: the parameters some loss had a
    gradient for. ``floor``: the relative floor of :func:`floor_` that a sub-batch
    estimate asks for (0: none)."""

    def __init__(self, draw: Draw, *, factor: float) -> None:
        self.draw, self.factor = draw, factor
        self.floor = 0.0
        self.zs: dict[int, Tensor] = {}
        self.hzs: dict[int, Tensor] = {}
        self.ahead: dict[int, Tensor] = {}
        self.behind: dict[int, Tensor] = {}
        self.inv_eps = 1.0
        self.partial_sums: dict[int, Tensor] = {}
        self.reached: set[int] = set()


def sample(params: list[Tensor], keys: list[int], implementations) -> list[Tensor]:
    """z for each of ``params`` (its sampler key in ``keys``), one call per device."""
    zs: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for ns in by_device(params).values():
        sampled = functional.sample_rademacher([params[n] for n in ns], [keys[n] for n in ns],
                                               backend=implementations.on(params[ns[0]].device))
        for n, z in zip(ns, sampled):
            zs[n] = z
    return zs


def add_sample_(
    acc: Accumulated, s: int, params: list[Tensor], indices: list[int], keys: list[int], zs: list[Tensor],
    hzs: list[Tensor] | None, *, difference: Difference | None = None, implementations,
) -> None:
    """Add sample ``s``'s products (of ``params`` at flat ``indices``, with z ``zs`` drawn
    with sampler ``keys``): ``hzs``, or a finite ``difference`` (``hzs`` None). The last
    sample's Hz is summed as it is (a difference's operands kept, one per step), the
    earlier samples' ``z * Hz`` into the partial sums."""
    if s == acc.draw.n_samples - 1:
        for n, (idx, z) in enumerate(zip(indices, zs)):
            acc.zs[idx] = z
            if difference is not None:
                assert idx not in acc.ahead, "a finite difference is taken once per step"
                acc.ahead[idx], acc.behind[idx], acc.inv_eps = difference.ahead[n], difference.behind[n], difference.inv_eps
            else:
                acc.hzs[idx] = hzs[n] if idx not in acc.hzs else acc.hzs[idx].add_(hzs[n])
        return
    sums = [acc.partial_sums.setdefault(idx, torch.zeros_like(p, dtype=state_dtype(p))) for idx, p in zip(indices, params)]
    for ns in by_device(params).values():
        functional.accumulate_hessian_(
            [sums[n] for n in ns], [zs[n] for n in ns], None if hzs is None else [hzs[n] for n in ns],
            keys=[keys[n] for n in ns], difference=None if difference is None else difference.select(ns),
            backend=implementations.on(params[ns[0]].device),
        )


def accumulate_(
    acc: Accumulated, grads: list[Tensor | None], params: list[Tensor], indices: list[int], *, implementations,
    record: graphs.GraphRecord, retain_graph: bool,
) -> None:
    """Add to ``acc`` the Hessian-vector products of the graph of ``grads`` (the
    gradients of ``params``, None where a loss does not reach one; ``indices``: their
    flat positions), one ``torch.autograd.grad`` call per sample. The graph is freed
    after the last sample unless ``retain_graph``. Gradients without a graph get zero
    Hessian rows (one warning per parameter, ``record``). RuntimeError naming the fix
    when the graph holds fused attention."""
    reached = [n for n, grad in enumerate(grads) if grad is not None]
    acc.reached.update(indices[n] for n in reached)
    graph = [n for n in reached if graphs.has_graph(grads[n])]
    record.warn_without_graph([(indices[n], params[n]) for n in reached if not graphs.has_graph(grads[n])])
    record.walk_once([grads[n] for n in graph])
    if not graph:
        return
    params, indices = [params[n] for n in graph], [indices[n] for n in graph]
    n_samples = acc.draw.n_samples
    for s in range(n_samples):
        keys = acc.draw.keys(indices, s)
        if s == n_samples - 1 and all(idx in acc.zs for idx in indices):
            zs = [acc.zs[idx] for idx in indices]  # an earlier loss of the step drew these z: the same ones
        else:
            zs = sample(params, keys, implementations)
        outputs = zs if acc.factor == 1.0 else torch._foreach_mul(zs, acc.factor)
        hzs = graphs.hessian_vector_products(
            [grads[n] for n in graph], params, outputs, retain_graph=retain_graph or s < n_samples - 1
        )
        add_sample_(acc, s, params, indices, keys, zs, hzs, implementations=implementations)


def finish(
    acc: Accumulated, params: list[Tensor], indices: list[int], *, implementations, loss_scale: amp.LossScale,
) -> tuple[Estimate, amp.Overflow | None]:
    """``acc`` as the Estimate of ``params`` (zero Hessian rows where it holds no
    product), Hz unscaled by ``S * c`` and checked under a loss scale (never a finite
    difference's: the optimizer refuses a GradScaler with one)."""
    keys = acc.draw.keys(indices, acc.draw.n_samples - 1)
    missing = [n for n, idx in enumerate(indices) if idx not in acc.zs]
    sampled = dict(zip(missing, sample([params[n] for n in missing], [keys[n] for n in missing], implementations)))
    zs = [sampled[n] if n in sampled else acc.zs[idx] for n, idx in enumerate(indices)]

    def gathered(products: dict[int, Tensor]) -> list[Tensor]:
        return [products[idx] if idx in products else torch.zeros_like(p) for idx, p in zip(indices, params)]

    hzs, difference = None, None
    if acc.ahead:
        assert loss_scale.scale is None, "a finite difference is never loss-scaled"
        difference = Difference(gathered(acc.ahead), gathered(acc.behind), acc.inv_eps)
    else:
        hzs = gathered(acc.hzs)
    partial_sums = None
    if acc.draw.n_samples > 1:
        partial_sums = [acc.partial_sums[idx] if idx in acc.partial_sums else torch.zeros_like(p, dtype=state_dtype(p))
                        for idx, p in zip(indices, params)]
    overflow = None
    if loss_scale.scale is not None:
        overflow = amp.unscale_and_check_(hzs + (partial_sums or []), loss_scale.scale * acc.factor, loss_scale.found_inf)
    return Estimate(zs, keys, hzs, partial_sums, difference), overflow


def from_accumulated(
    acc: Accumulated, params: list[Tensor], grads: list[Tensor | None], indices: list[int], *, implementations,
    record: graphs.GraphRecord, loss_scale: amp.LossScale,
) -> tuple[Estimate, amp.Overflow | None]:
    """:func:`finish`, after one warning for the parameters that have a gradient but
    that no loss of the step reached (their Hessian rows are zero)."""
    record.warn_unreached([(idx, p) for idx, p, grad in zip(indices, params, grads)
                           if grad is not None and p.numel() and idx not in acc.reached])
    return finish(acc, params, indices, implementations=implementations, loss_scale=loss_scale)


def floor_(estimate: Estimate, floor: float, n_samples: int) -> None:
    """Raise each |D| below ``floor`` times its tensor's mean |D| to that value, sign
    kept (zeros become positive), in place: Hz is rewritten so that the step's
    ``D = (partial_sums + z * Hz) / n_samples`` is the floored one (z * z = 1). For a
    sub-batch Hessian: in a piecewise-linear model (ReLU, max-pool) a weight whose unit
    is inactive on every sample of the sub-batch has D = 0 exactly while the full
    batch's gradient is not zero, and its update ``lr * m / (|D| + eps)`` explodes
    (README, "Gradient accumulation and a sub-batch Hessian"). Only hessian_backward
    asks for it, which a finite difference refuses: ``estimate`` holds Hz itself."""
    assert estimate.difference is None, "a finite-difference estimate is never floored"
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


MIXING_MESSAGE = (
    "AdaHessian: this step mixes optimizer.backward()/hessian_backward() with "
    "loss.backward(create_graph=True); use one of them per step (optimizer.backward(loss) "
    "is the drop-in for loss.backward(create_graph=...))."
)
OTHER_STEP_MESSAGE = (
    "AdaHessian: the Hessian-vector products accumulated by optimizer.backward()/"
    "hessian_backward() belong to another step (n_samples or seed changed, or a state_dict "
    "was loaded, since the step's first backward): call zero_grad() and compute them again."
)


def checked_floor(floor: float) -> float:
    """hessian_backward's ``floor``, ValueError unless a number in [0, 1]."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ValueError(f"Invalid floor: {floor!r} (a fraction of the mean |D|, in [0, 1])")
    return floor


def check_loss(loss: Tensor, method: str) -> None:
    """RuntimeError unless ``loss`` (given to ``AdaHessian.<method>``) can be differentiated."""
    if not (isinstance(loss, Tensor) and loss.requires_grad):
        raise RuntimeError(
            f"AdaHessian.{method}() needs a loss tensor that requires grad, got {loss!r}: compute it from the "
            "model's outputs with grad mode on (not under torch.no_grad() or inference_mode, and not .detach()ed "
            "or .item())."
        )


class Accumulator:
    """The accumulation protocol of ``AdaHessian.backward`` and ``hessian_backward``
    with double backward: each call differentiates its loss with ``create_graph=True``,
    adds the loss's Hessian-vector products with the step's z to the pending
    :class:`Accumulated` and frees the graph before returning; the next step takes the
    sum (:meth:`take`), ``zero_grad`` drops it."""

    def __init__(self, record: graphs.GraphRecord) -> None:
        self.record = record
        self.pending: Accumulated | None = None

    def take(self) -> Accumulated | None:
        """The products for this step (the step uses them once, whatever happens)."""
        pending, self.pending = self.pending, None
        return pending

    def backward(
        self, loss: Tensor, params: list[Tensor], indices: list[int], *, draw: Draw, factor: float,
        implementations, gradients: bool,
    ) -> Accumulated:
        """Differentiate ``loss`` for ``params`` (flat ``indices``, those that require
        grad) with ``create_graph=True`` (into ``p.grad`` when ``gradients``), and add its
        products; the pending sum is returned. RuntimeError for a loss that reaches no
        parameter, a step that mixes paths, and products of another ``draw``."""
        refuse_mixing([p.grad for p in params])
        if self.pending is None:
            self.pending = Accumulated(draw, factor=factor)
        check_draw(self.pending, draw)
        try:
            if gradients:
                before = [p.grad for p in params]
                torch.autograd.backward(loss, inputs=params, create_graph=True)
                grads = [p.grad if p.grad is not b else None for p, b in zip(params, before)]
            else:
                grads = list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))
            if all(g is None for g in grads):
                raise RuntimeError(
                    "AdaHessian: the loss reaches none of the optimizer's parameters (no gradient "
                    "flows to them): pass the loss computed from the model this optimizer trains."
                )
            accumulate_(self.pending, grads, params, indices, implementations=implementations, record=self.record,
                        retain_graph=False)
        finally:
            release_graphs(params)
        return self.pending


def check_draw(acc: Accumulated, draw: Draw | None) -> None:
    """RuntimeError unless ``acc`` was made for ``draw`` (None: not a Hessian step): a
    change of n_samples or seed, or a load_state_dict, since the step's first backward()."""
    if acc.draw != draw:
        raise RuntimeError(OTHER_STEP_MESSAGE)


def refuse_mixing(grads: list[Tensor | None]) -> None:
    if any(g is not None and graphs.has_graph(g) for g in grads):
        raise RuntimeError(MIXING_MESSAGE)


def release_graphs(params: list[Tensor]) -> None:
    """Drop the graph of every gradient that holds one: backward(create_graph=True) makes
    param -> grad -> graph -> param cycles that gc cannot see through (they pass
    through C++); dropping the graph breaks them."""
    for p in params:
        grad = p.grad
        if grad is not None and grad.requires_grad:
            p.grad = grad.detach()
