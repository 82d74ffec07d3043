"""Which implementation runs a step: ``backend="reference" | "fused" | "auto"``."""

from __future__ import annotations

import warnings

import torch

from . import _ops


def fused_unavailable_reason(device: torch.device) -> str | None:
    """None when the compiled kernels can run on ``device``, else why not (the first
    call for a device type without built kernels JIT-builds them)."""
    return _ops.load_error(device.type)


def resolve(requested: str, device: torch.device) -> str:
    """The backend that runs on ``device``: "fused" or "reference"."""
    if requested == "reference":
        return "reference"
    reason = fused_unavailable_reason(device)
    if reason is None:
        return "fused"
    if requested == "fused":
        raise RuntimeError(
            f"AdaHessian(backend='fused') is not available: {reason}. "
            "Use backend='auto' (falls back to the reference path) or backend='reference'."
        )
    warnings.warn(f"AdaHessian(backend='auto'): {reason}; using the reference path.", stacklevel=4)
    return "reference"
