"""The one-liner for transformers: attention that survives a double backward."""

from __future__ import annotations

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel


def math_attention() -> contextlib.AbstractContextManager:
    """Context manager that restricts ``F.scaled_dot_product_attention`` (and so
    ``nn.TransformerEncoderLayer``/``nn.MultiheadAttention``'s fast path) to the math
    kernel, the only one with a double backward. Wrap the forward pass of a Hessian
    step in it::

        with adahessian.math_attention():
            loss = loss_fn(model(x), y)
        loss.backward(create_graph=True)
    """
    return sdpa_kernel(SDPBackend.MATH)
