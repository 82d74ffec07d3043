"""Which implementation runs a step: ``backend="reference" | "fused" | "auto"``, resolved
once per device (:class:`Implementations`). Each implementation is a module of the same
functions (``sample_rademacher``, ``accumulate_hessian_``, ``step_``) and its ``NAME``:
:mod:`.reference` and :mod:`.fused`."""

from __future__ import annotations

from types import ModuleType

import torch

from .. import _ops
from .._warnings import warn
from . import fused, reference

BACKENDS = ("auto", "fused", "reference")
IMPLEMENTATIONS = {"reference": reference, "fused": fused}


def implementation(backend: str | ModuleType) -> ModuleType:
    """The implementation ``backend`` is, or names ("reference" or "fused")."""
    if isinstance(backend, ModuleType):
        return backend
    try:
        return IMPLEMENTATIONS[backend]
    except KeyError:
        raise ValueError(f"unknown AdaHessian backend {backend!r} (one of {', '.join(map(repr, IMPLEMENTATIONS))})") from None


def fused_unavailable_reason(device: torch.device) -> str | None:
    """None when the compiled kernels can run on ``device``, else why not (the first
    call for a device type without built kernels JIT-builds them)."""
    return _ops.load_error(device.type)


def resolve(requested: str, device: torch.device) -> ModuleType:
    """The implementation that runs on ``device`` for the ``backend`` setting
    ``requested``. RuntimeError when "fused" is requested and unavailable; "auto" falls
    back to the reference path with one warning."""
    if requested == "reference":
        return reference
    reason = fused_unavailable_reason(device)
    if reason is None:
        return fused
    if requested == "fused":
        raise RuntimeError(
            f"AdaHessian(backend='fused') is not available: {reason}. "
            "Use backend='auto' (falls back to the reference path) or backend='reference'."
        )
    warn(f"AdaHessian(backend='auto'): {reason}; using the reference path.")
    return reference


class Implementations:
    """The implementation per device for one value of the ``backend`` setting: resolved
    at the first use of each device (``"auto"`` warns then), a dictionary read after."""

    def __init__(self, requested: str) -> None:
        self.requested = requested
        self._by_device: dict[torch.device, ModuleType] = {}

    def on(self, device: torch.device) -> ModuleType:
        found = self._by_device.get(device)
        if found is None:
            found = self._by_device[device] = resolve(self.requested, device)
        return found

    def describe(self, devices) -> str:
        """The implementation that runs on ``devices``: its name ("fused" or
        "reference"), or each device's where they differ ("fused on cuda:0, reference on
        cpu")."""
        names = {device: self.on(device).NAME for device in devices}
        if len(set(names.values())) == 1:
            return next(iter(names.values()))
        return ", ".join(f"{name} on {device}" for device, name in names.items())
