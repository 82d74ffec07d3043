"""The gradients' autograd graph, as the Hessian-vector products use it: the record that
tells a missing ``create_graph=True`` (the user's to fix) from a gradient that has no
graph although one was asked for, the one ``torch.autograd.grad`` call per sample that
differentiates it, and autograd's failure modes turned into errors and warnings that
say what to do.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from . import distributed
from ._warnings import warn

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
                warn(ONCE_DIFFERENTIABLE_WARNING)

    def _warn_once(self, pairs: list[tuple[int, Tensor]], message: Callable[[str], str]) -> None:
        new = [(idx, p) for idx, p in pairs if idx not in self.warned and p.numel()]
        if new:
            self.warned.update(idx for idx, _ in new)
            warn(message(", ".join(str(tuple(p.shape)) for _, p in new)))


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


# What D = 0 does to the update (docs/algorithm.md, step 5: the denominator is eps).
EPS_ALONE = (
    "their update divides by eps alone: each step moves such an element by up to lr * |m| / eps, lr / eps "
    "times its running mean gradient (10^7 times at lr=0.1, eps=1e-8); a larger eps bounds it (1e-4 is stable "
    "on small CNNs and transformers)"
)


def _no_graph_warning(shapes: str) -> str:
    return (
        f"AdaHessian: backward ran with create_graph=True, but the gradient of the "
        f"parameter(s) of shape {shapes} has no autograd graph, so their Hessian rows are "
        f"taken as zero (D = 0; {EPS_ALONE}). Possible causes: the loss "
        "is linear in them (then D = 0 is exact); a custom torch.autograd.Function or fused "
        "kernel without double backward (e.g. a backward marked @once_differentiable) on "
        "the path from them to the loss; .detach() or torch.no_grad() inside the model."
    )


def _unreached_warning(shapes: str) -> str:
    return (
        f"AdaHessian: no loss given to optimizer.backward() or optimizer.hessian_backward() "
        f"in this step reached the parameter(s) of shape {shapes}, which have a gradient: "
        f"their Hessian rows are taken as zero (D = 0; {EPS_ALONE}). "
        "Give hessian_backward a loss that depends on every trained parameter (a sub-batch "
        "that exercises the same parts of the model as the full batch)."
    )


def _record(modes: dict[int, bool], index: int, _param: Tensor) -> None:
    modes[index] = torch.is_grad_enabled()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
