"""Which implementation runs a step: ``backend="reference" | "fused" | "auto"``. Each
implementation is a module of the same functions (``sample_rademacher``,
``accumulate_hessian_``, ``step_``): :mod:`.reference` and :mod:`.fused`."""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

from .. import _ops
from . import fused, reference

BACKENDS = ("auto", "fused", "reference")
IMPLEMENTATIONS = {"reference": reference, "fused": fused}


def implementation(name: str) -> ModuleType:
    """The module of a resolved backend ("reference" or "fused")."""
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown AdaHessian backend {name!r} (one of {', '.join(map(repr, IMPLEMENTATIONS))})") from None


def fused_unavailable_reason(device: torch.device) -> str | None:
    """None when the compiled kernels can run on ``device``, else why not (the first
    call for a device type without built kernels JIT-builds them)."""
    return _ops.load_error(device.type)


def resolve(requested: str, device: torch.device) -> str:
    """The backend that runs on ``device``: "fused" or "reference". RuntimeError when
    "fused" is requested and unavailable; "auto" falls back with one warning."""
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
