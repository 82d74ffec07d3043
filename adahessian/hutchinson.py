"""Hutchinson orchestration: the Hessian-vector products behind ``D = E[z * Hz]``.

Python owns this part on every backend: it differentiates the gradients (built with
``create_graph=True``) against Rademacher vectors through one ``torch.autograd.grad``
call per sample, and turns autograd's failure modes into errors that say what to do.
"""

from __future__ import annotations

import torch
from torch import Tensor

NO_GRAPH_MESSAGE = (
    "AdaHessian needs the graph of the gradients to compute Hessian-vector products, but "
    "no gradient has one: call loss.backward(create_graph=True) before optimizer.step() "
    "(or loss.backward(create_graph=optimizer.hessian_due) to pay for it only on the "
    "steps that recompute the Hessian)."
)

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
