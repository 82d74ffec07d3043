"""The Hutchinson estimate ``D = E[z * Hz]`` of the Hessian diagonal (docs/algorithm.md,
section 1, step 1): Rademacher vectors from the pinned sampler, Hessian-vector products
from the gradients' graph, one ``torch.autograd.grad`` call per sample over all
parameters, on every backend. Also the record that tells a missing
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
    "update_each, n_samples or average_conv_kernel, since a change makes the next step a "
    "Hessian step)."
)

SDPA_MESSAGE = (
    "AdaHessian could not differentiate the gradients a second time: PyTorch's fused "
    "scaled-dot-product-attention kernels (flash / memory-efficient / cuDNN, used by "
    "nn.TransformerEncoderLayer and F.scaled_dot_product_attention) have no double "
    "backward. Run the forward pass under the math kernel: "
    "`with adahessian.math_attention(): loss = loss_fn(model(x), y)` (the same as "
    "`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`)."
)


class Estimate(NamedTuple):
    """A Hessian step's Hutchinson data, aligned with the step's parameter list: the
    last sample's z (the parameters' dtype), its sampler keys and Hz (unscaled), and the
    sum of ``z * Hz`` over the earlier samples (the state dtype; None when
    ``n_samples == 1``)."""

    zs: list[Tensor]
    keys: list[int]
    hzs: list[Tensor]
    partial_sums: list[Tensor] | None

    def select(self, ns: list[int]) -> Estimate:
        """The estimate of the parameters at positions ``ns``."""
        pick = [self.zs, self.keys, self.hzs, self.partial_sums]
        return Estimate(*(None if xs is None else [xs[n] for n in ns] for xs in pick))

    def tensors(self) -> list[Tensor]:
        """The tensors that distributed training averages across ranks."""
        return self.hzs + (self.partial_sums or [])


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
        fix (RuntimeError); after one with it, the Hessian rows are zero (D = 0) and one
        warning per parameter names the possible causes. Where no hook saw the gradient
        arrive (set by hand), a step with no graph at all is taken for the former."""
        missing, plain = [], False
        for idx, p, grad in zip(indices, params, grads):
            if grad is None or has_graph(grad) or p.numel() == 0:
                continue
            created = self.create_graph.get(idx)
            plain = plain or created is False or (created is None and not any_graph)
            missing.append((idx, p))
        if plain:
            raise RuntimeError(NO_GRAPH_MESSAGE + distributed.ddp_hint())
        new = [(idx, p) for idx, p in missing if idx not in self.warned]
        if new:
            self.warned.update(idx for idx, _ in new)
            warnings.warn(_no_graph_warning(", ".join(str(tuple(p.shape)) for _, p in new)), stacklevel=5)
        if not self.walked:  # once: the walk visits the whole graph
            self.walked = True
            if _passes_once_differentiable([g for g in grads if g is not None and has_graph(g)]):
                warnings.warn(ONCE_DIFFERENTIABLE_WARNING, stacklevel=5)


def estimate(
    params: list[Tensor],
    grads: list[Tensor | None],
    indices: list[int],
    *,
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
    ``counter + s``. Under a loss scale, Hz is unscaled and checked, backing off on
    overflow: the second result says whether the step overflowed (None without a
    scale). Raises RuntimeError when the gradients have no graph (``record.check``) or
    the graph has no double backward (fused attention)."""
    graph = [n for n, grad in enumerate(grads) if grad is not None and has_graph(grad)]
    record.check(indices, params, grads, any_graph=bool(graph))
    by_device: dict[torch.device, list[int]] = {}
    for n, p in enumerate(params):
        by_device.setdefault(p.device, []).append(n)
    partial_sums = [torch.zeros_like(p, dtype=state_dtype(p)) for p in params] if n_samples > 1 else None
    for s in range(n_samples):
        keys = [sampler.rademacher_key(seed, idx, counter + s) for idx in indices]
        zs: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        for device, ns in by_device.items():
            sampled = functional.sample_rademacher([params[n] for n in ns], [keys[n] for n in ns], backend=backend_for(device))
            for n, z in zip(ns, sampled):
                zs[n] = z
        hzs: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
        overflow = None
        if graph:
            args = ([grads[n] for n in graph], [params[n] for n in graph], [zs[n] for n in graph])
            if loss_scale.scale is None:
                graph_hzs = hessian_vector_products(*args, retain_graph=s < n_samples - 1)
            else:
                graph_hzs, overflow = _scaled_hessian_vector_products(*args, loss_scale=loss_scale, hessian_scale=hessian_scale)
            for n, hz in zip(graph, graph_hzs):
                hzs[n] = hz
        # Gradients without a graph (or no gradient on this rank): zero Hessian rows.
        hzs = [torch.zeros_like(p) if hz is None else hz for hz, p in zip(hzs, params)]
        if overflow not in (None, amp.Overflow.NONE):
            break  # the step is skipped (every rank still joins the all-reduce)
        if s < n_samples - 1:
            for device, ns in by_device.items():
                functional.accumulate_hessian_(
                    [partial_sums[n] for n in ns], [zs[n] for n in ns], [hzs[n] for n in ns],
                    keys=[keys[n] for n in ns], backend=backend_for(device),
                )
    if overflow is not None and overflow is not amp.Overflow.GRADIENTS:
        hessian_scale.finished(ok=overflow is amp.Overflow.NONE)
    return Estimate(zs, keys, hzs, partial_sums), overflow


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


def _scaled_hessian_vector_products(
    grads: list[Tensor], params: list[Tensor], vectors: list[Tensor], *,
    loss_scale: amp.LossScale, hessian_scale: amp.HessianScale,
) -> tuple[list[Tensor], amp.Overflow]:
    """``H z`` under a loss scale S: computed on ``z * c`` (``hessian_scale``), divided
    by ``S * c`` and checked in one pass, retried with a lower c on overflow (the graph is
    retained for the retries; ``step()`` frees it). One host read per try."""
    retries = 0
    while True:
        c = hessian_scale.scale
        outputs = vectors if c == 1.0 else torch._foreach_mul(vectors, c)
        hzs = hessian_vector_products(grads, params, outputs, retain_graph=True)
        overflow = amp.unscale_and_check_(hzs, loss_scale.scale * c, loss_scale.found_inf)
        if overflow is not amp.Overflow.HESSIAN or retries == hessian_scale.RETRIES or not hessian_scale.back_off():
            return hzs, overflow
        retries += 1


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


def _record(modes: dict[int, bool], index: int, _param: Tensor) -> None:
    modes[index] = torch.is_grad_enabled()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
