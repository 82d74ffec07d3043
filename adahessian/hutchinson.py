"""Hutchinson orchestration: the Hessian-vector products behind ``D = E[z * Hz]``.

Python owns this part on every backend: it differentiates the gradients (built with
``create_graph=True``) against Rademacher vectors through one ``torch.autograd.grad``
call per sample, and turns autograd's failure modes into errors that say what to do.
"""

from __future__ import annotations

import functools
import weakref
import torch
from torch import Tensor

from . import functional
from .amp import HessianScale, Overflow

NO_GRAPH_MESSAGE = (
    "AdaHessian needs the graph of the gradients to compute Hessian-vector products, but "
    "the gradients were computed without one: call loss.backward(create_graph=True) before "
    "optimizer.step() (or loss.backward(create_graph=optimizer.hessian_due) to pay for it "
    "only on the steps that recompute the Hessian)."
)


def no_graph_warning(shapes: str) -> str:
    return (
        f"AdaHessian: backward ran with create_graph=True, but the gradient of the "
        f"parameter(s) of shape {shapes} has no autograd graph, so their Hessian rows are "
        "taken as zero (D = 0; their update divides by eps alone). Possible causes: the loss "
        "is linear in them (then D = 0 is exact); a custom torch.autograd.Function or fused "
        "kernel without double backward (e.g. a backward marked @once_differentiable) on "
        "the path from them to the loss; .detach() or torch.no_grad() inside the model."
    )


class BackwardModes:
    """Whether each watched parameter's gradient was last accumulated by a backward with
    ``create_graph=True`` (grad mode is on in the backward pass exactly then), recorded
    by a post-accumulate-grad hook. Tells a missing ``create_graph`` (the user's fix)
    from a gradient that has no graph although one was asked for (zero curvature, or a
    part of the model without double backward)."""

    def __init__(self) -> None:
        self.modes: dict[int, bool] = {}
        self._handles: list = []

    def watch(self, index: int, param: Tensor) -> None:
        if param.requires_grad and param.is_leaf:
            self._handles.append(param.register_post_accumulate_grad_hook(functools.partial(_record, self.modes, index)))

    def bind(self, owner: object) -> None:
        """Remove the hooks when ``owner`` (the optimizer) is garbage-collected."""
        weakref.finalize(owner, _remove, self._handles)


def _record(modes: dict[int, bool], index: int, _param: Tensor) -> None:
    modes[index] = torch.is_grad_enabled()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


def scaled_hessian_vector_products(
    grads: list[Tensor], params: list[Tensor], vectors: list[Tensor], *,
    scale: HessianScale, hz_ratio: float, found_inf: Tensor | None,
) -> tuple[list[Tensor], Overflow]:
    """``H z`` under a loss scale, brought to the gradients' scale (``hz_ratio``, see
    :class:`adahessian.amp.LossScale`), with ``scale``'s back-off on overflow (the
    graph is retained for the retries; ``step()`` frees it). One host read per try."""
    retries = 0
    while True:
        c = scale.scale
        outputs = vectors if c == 1.0 else torch._foreach_mul(vectors, c)
        hzs = hessian_vector_products(grads, params, outputs, retain_graph=True)
        if hz_ratio / c != 1.0:
            torch._foreach_mul_(hzs, hz_ratio / c)
        flags = functional.nonfinite(hzs).to(torch.uint8) * 2
        if found_inf is not None:
            flags = flags + (found_inf.to(flags.device) > 0)
        status = int(flags.item())
        if status & 1:
            return hzs, Overflow.GRADIENTS
        if status == 0:
            return hzs, Overflow.NONE
        if retries == scale.RETRIES or not scale.back_off():
            return hzs, Overflow.HESSIAN
        retries += 1

SDPA_MESSAGE = (
    "AdaHessian could not differentiate the gradients a second time: PyTorch's fused "
    "scaled-dot-product-attention kernels (flash / memory-efficient / cuDNN, used by "
    "nn.TransformerEncoderLayer and F.scaled_dot_product_attention) have no double "
    "backward. Run the forward pass under the math kernel: "
    "`with adahessian.math_attention(): loss = loss_fn(model(x), y)` (the same as "
    "`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`)."
)


def has_graph(grad: Tensor) -> bool:
    """Was this gradient built with ``create_graph=True`` from something differentiable?"""
    return grad.requires_grad


def hessian_vector_products(
    grads: list[Tensor], params: list[Tensor], vectors: list[Tensor], *, retain_graph: bool
) -> list[Tensor]:
    """``H z`` for every parameter, from one autograd call. A parameter that the
    gradients' graph does not reach gets zeros (its Hessian rows are zero)."""
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
