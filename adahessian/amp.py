"""Mixed precision: the one place that decides GradScaler skips and unscales.

A GradScaler multiplies the loss by S, so both the gradients and Hz carry S. Here, and
nowhere else, the gradients are divided by S in place (``p.grad`` is unscaled after
``step()`` on every path, as after ``scaler.unscale_``), Hz is divided by S as it comes
out of the Hessian-vector product, and a step is skipped when either is non-finite. The
update kernels never see a loss scale.

The scaler sees only the gradients; Hz, typically larger, can overflow float16 while
the gradients do not, and the scaler would then never back off. So the Hessian-vector
product has its own factor ``c`` (a power of two, at most 1): its ``grad_outputs`` are
``z * c``, so the raw Hz carries ``S * c``. On a non-finite Hz, ``c`` backs off and the
products are retried within the step (or, for products already summed by
``AdaHessian.backward``, the step is skipped); ``c`` grows back after a run of finite Hessian
steps, as GradScaler's scale does (README, "Mixed precision").

Host reads with a GradScaler: one per step (on a Hessian step, one per try of the
product, which reads the scaler's flag too); none without one.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._warnings import warn
from .devices import by_device

UNSCALED_MESSAGE = (
    "AdaHessian cannot step after scaler.unscale_(optimizer) (e.g. for gradient clipping) "
    "without knowing the loss scale: unscale_ divides the gradients by it, but the "
    "Hessian-vector products still carry it and GradScaler does not pass it on. Hand the "
    "optimizer its scaler once, optimizer.attach_grad_scaler(scaler), or call "
    "scaler.step(optimizer) without unscale_ (AdaHessian unscales gradients and Hz itself)."
)


class LossScale(NamedTuple):
    """What GradScaler left on the optimizer for this step.

    ``scale``: the loss scale S that Hz carries (a 1-element float32 tensor; None without
    a scaler: then nothing is unscaled or checked). ``grads_scaled``: the gradients carry
    S too (False after ``scaler.unscale_``). ``found_inf``: GradScaler's flag for the
    gradients (None without a scaler).
    """

    scale: Tensor | None
    grads_scaled: bool
    found_inf: Tensor | None


def loss_scale(optimizer: Any, attached: Any) -> LossScale:
    """Read GradScaler's attributes off ``optimizer`` (``attached``: the scaler given to
    ``attach_grad_scaler``, or None). Raises RuntimeError for a step after ``unscale_``
    that found no inf, when no scaler is attached."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return LossScale(None, False, None)
    if grad_scale is not None:
        return LossScale(grad_scale, True, found_inf)
    # After scaler.unscale_: the gradients are unscaled (and maybe clipped), Hz is not.
    if attached is not None:
        return LossScale(torch.tensor([attached.get_scale()], dtype=torch.float32), False, found_inf)
    if bool(found_inf):
        return LossScale(torch.ones(1), False, found_inf)  # skipped anyway: nothing to unscale
    raise RuntimeError(UNSCALED_MESSAGE)


def found_inf(scale: LossScale) -> bool:
    """Did GradScaler find an inf/NaN in the gradients (the step is skipped)? One host
    read; False without a scaler."""
    return scale.found_inf is not None and bool(scale.found_inf)


def settle_(scale: LossScale, overflow: Overflow | None, lists, distributor):
    """The GradScaler stage of a step, and its one decision whether the step is skipped
    (GradScaler semantics: nothing changes; returns None then): the gradients of
    ``lists`` (a :class:`adahessian.distributed.StepLists`) are unscaled in place (so
    ``p.grad`` is unscaled after ``step()``, as after ``scaler.unscale_``), and averaged
    across ranks by ``distributor``. A single process decides first, from ``overflow``
    (the checked Hessian-vector product's outcome, which read both flags at once) or else
    GradScaler's flag (one host read), and unscales only a step it takes; ranks unscale
    first (their scales may differ) and decide on the average, so all decide alike.
    Returns the lists the update runs on."""
    grads = [g for g in lists.grads if g is not None]
    if not distributor.communicates:
        if overflow is not None and overflow is not Overflow.NONE:
            return None
        if overflow is None and found_inf(scale):
            return None
        _unscale_gradients_(grads, scale)
        return lists
    _unscale_gradients_(grads, scale)
    lists = distributor.average_(lists)
    if scale.found_inf is not None and any_nonfinite(lists.grads + lists.estimate_tensors()):
        return None
    return lists


def _unscale_gradients_(grads: list[Tensor], scale: LossScale) -> None:
    """Divide the gradients by the loss scale, in place: the only place gradients are
    unscaled."""
    if scale.scale is None or not scale.grads_scaled:
        return
    for device, ns in by_device(grads).items():
        torch._foreach_mul_([grads[n] for n in ns], _reciprocal(scale.scale, device))


def unscale_and_check_(tensors: list[Tensor], divisor: Tensor, found_inf: Tensor | None) -> Overflow:
    """Divide ``tensors`` (Hz) by ``divisor`` in place, then check them for inf/NaN (after
    the division: a divisor below 1 can overflow a finite value); one host read, which
    reads GradScaler's ``found_inf`` too. A product that is NaN with none infinite is
    not an overflow (an overflow leaves an inf in some tensor's maximum): NAN, which no
    smaller scale can help."""
    for device, ns in by_device(tensors).items():
        torch._foreach_mul_([tensors[n] for n in ns], _reciprocal(divisor, device))
    norms = _max_norms(tensors)
    status = 2 * torch.isinf(norms).any().to(torch.int32) + 4 * torch.isnan(norms).any().to(torch.int32)
    if found_inf is not None:
        status += (found_inf.to(status.device).reshape(()) > 0).to(torch.int32)
    status = int(status.item())
    if status & 1:
        return Overflow.GRADIENTS
    if status & 2:
        return Overflow.HESSIAN
    return Overflow.NAN if status else Overflow.NONE


def any_nonfinite(tensors: list[Tensor]) -> bool:
    """Does any tensor hold an inf or NaN? One host read."""
    return bool(_nonfinite(tensors))


def _nonfinite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor (no host read): any inf or NaN in ``tensors``?"""
    return torch.logical_not(torch.isfinite(_max_norms(tensors)).all())


def _max_norms(tensors: list[Tensor]) -> Tensor:
    """Each tensor's max |x| in one 1-D tensor (no host read; NaN where it holds a NaN):
    one foreach max-norm per device (empty tensors have none, and no max-norm)."""
    tensors = [t for t in tensors if t.numel()]
    norms = [n.reshape(1) for ns in by_device(tensors).values()
             for n in torch._foreach_norm([tensors[k] for k in ns], float("inf"))]
    if not norms:
        return torch.zeros(0)
    device = norms[0].device
    return torch.cat([n.to(device) for n in norms])


def _reciprocal(scale: Tensor, device: torch.device) -> Tensor:
    """1 / scale as the 0-dim float32 tensor on ``device`` that _foreach_mul_ takes
    (exact for GradScaler's powers of two)."""
    return scale.to(device).double().reciprocal().float().reshape(())


class Overflow(Enum):
    """Outcome of a checked Hessian-vector product under a loss scale."""

    NONE = 0
    GRADIENTS = 1  # GradScaler found an inf/NaN in the gradients: the step is skipped
    HESSIAN = 2  # Hz stayed non-finite through every back-off: the step is skipped
    NAN = 3  # Hz is NaN, none of it infinite: not an overflow, not retried; the step is skipped


class HessianScale:
    """The factor ``c`` on the Hessian-vector product's ``grad_outputs`` (module doc).

    ``scale``: c, a power of two in [MIN_SCALE, 1]. Per Hessian step (all its samples
    together), at most ``RETRIES`` back-offs by ``BACKOFF`` (so one step covers a factor
    2^16 of overflow); a step whose Hz is still non-finite is skipped
    (``skipped_steps``), and ``c`` stays backed off for the next one. Products summed by
    ``AdaHessian.backward`` / ``hessian_backward`` have no graph left to retry: on
    overflow the step is skipped after one back-off. After ``GROWTH_INTERVAL`` Hessian steps in a row with
    no back-off, c doubles (up to 1). ``backoffs`` counts back-offs, for the record.
    """

    BACKOFF = 2.0**-4
    RETRIES = 4
    GROWTH_INTERVAL = 100
    MIN_SCALE = 2.0**-64
    FIELDS = ("scale", "growth_tracker", "backoffs", "skipped_steps", "consecutive_skips")

    def __init__(self) -> None:
        self.scale = 1.0
        self.growth_tracker = 0
        self.backoffs = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def back_off(self) -> bool:
        """Lower c after a non-finite Hz; False when it cannot go lower."""
        if self.scale <= self.MIN_SCALE:
            return False
        self.scale = max(self.scale * self.BACKOFF, self.MIN_SCALE)
        self.backoffs += 1
        self.growth_tracker = 0
        return True

    def finished(self, outcome: Overflow) -> None:
        """Record a Hessian step's outcome (NONE: its Hz were finite; HESSIAN, NAN:
        skipped), warning at the 2nd, 4th, 8th, ... overflow in a row and at the 1st,
        2nd, 4th, ... NaN."""
        if outcome is not Overflow.NONE:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            power_of_two = self.consecutive_skips & (self.consecutive_skips - 1) == 0
            if outcome is Overflow.NAN and power_of_two:
                warn(
                    f"AdaHessian: {self.consecutive_skips} Hessian step(s) in a row skipped because the "
                    "Hessian-vector products are NaN, with none of them infinite: not an overflow, so no smaller "
                    "scale can help. A known cause is float16 autocast on the CPU with a convolution followed by "
                    "BatchNorm, whose double backward returns NaN there (a PyTorch limitation): use bfloat16 "
                    "autocast on the CPU (it needs no GradScaler). Otherwise the model's forward or backward "
                    "produces NaN: check it without the scaler."
                )
            elif outcome is Overflow.HESSIAN and self.consecutive_skips >= 2 and power_of_two:
                warn(
                    f"AdaHessian: {self.consecutive_skips} Hessian steps in a row skipped "
                    f"because the Hessian-vector products were not finite even at a factor "
                    f"{self.scale:g} below the loss scale: the curvature itself overflows "
                    "(check the loss and the learning rate), or the model produces inf/NaN."
                )
            return
        self.consecutive_skips = 0
        self.growth_tracker += 1
        if self.growth_tracker >= self.GROWTH_INTERVAL and self.scale < 1.0:
            self.scale = min(self.scale * 2.0, 1.0)
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        for name in self.FIELDS:
            if name in state:
                setattr(self, name, type(getattr(self, name))(state[name]))
