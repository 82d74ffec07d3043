"""Mixed precision: GradScaler's loss scale on the gradients and on Hz, and the
optimizer's own back-off for Hessian-vector products that overflow.

A GradScaler multiplies the loss by S, so both the gradients and Hz carry S. The scaler
sees only the gradients; Hz, typically larger, can overflow float16 while the gradients
do not, and the scaler would then never back off. So the Hessian-vector product has its
own factor ``c`` (a power of two, at most 1): its ``grad_outputs`` are ``z * c``, so the
raw Hz carries ``S * c``. On a non-finite Hz, ``c`` backs off and the product is
retried within the step; ``c`` grows back after a run of finite Hessian steps, as
GradScaler's scale does (README, "Mixed precision").
"""

from __future__ import annotations

import warnings
from enum import Enum
from typing import Any, NamedTuple

from torch import Tensor

UNSCALED_MESSAGE = (
    "AdaHessian cannot step after scaler.unscale_(optimizer) (e.g. for gradient clipping) "
    "without knowing the loss scale: unscale_ divides the gradients by it, but the "
    "Hessian-vector products still carry it and GradScaler does not pass it on. Hand the "
    "optimizer its scaler once, optimizer.attach_grad_scaler(scaler), or call "
    "scaler.step(optimizer) without unscale_ (AdaHessian unscales gradients and Hz itself)."
)


class LossScale(NamedTuple):
    """What GradScaler left on the optimizer for this step.

    ``grad_scale``: the scale the gradients still carry (None: unscaled, or no scaler);
    the update divides gradients and Hz by it. ``found_inf``: GradScaler's flag (None
    without a scaler). ``hz_ratio``: the factor that brings Hz (which carries the full
    loss scale S) to the gradients' scale, ``grad_scale / S``: 1 before ``unscale_``,
    ``1 / S`` after it. None when no scaler is involved (then nothing is checked).
    """

    grad_scale: Tensor | None
    found_inf: Tensor | None
    hz_ratio: float | None


def loss_scale(optimizer: Any, attached: Any) -> LossScale:
    """Read GradScaler's attributes off ``optimizer`` (``attached``: the scaler given to
    ``attach_grad_scaler``, or None). Raises RuntimeError for a step after ``unscale_``
    that found no inf, when no scaler is attached."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return LossScale(None, None, None)
    if grad_scale is not None:
        return LossScale(grad_scale, found_inf, 1.0)
    # After scaler.unscale_: the gradients are unscaled (and maybe clipped), Hz is not.
    if attached is not None:
        return LossScale(None, found_inf, 1.0 / attached.get_scale())
    if bool(found_inf):
        return LossScale(None, found_inf, 1.0)  # skipped anyway: nothing to unscale
    raise RuntimeError(UNSCALED_MESSAGE)


class Overflow(Enum):
    """Outcome of a checked Hessian-vector product under a loss scale."""

    NONE = 0
    GRADIENTS = 1  # GradScaler found an inf/NaN in the gradients: the step is skipped
    HESSIAN = 2  # Hz stayed non-finite through every back-off: the step is skipped


def gradients_overflowed(scale: LossScale) -> bool:
    """GradScaler's flag, read on the host (one synchronisation)."""
    return scale.found_inf is not None and bool(scale.found_inf)


class HessianScale:
    """The factor ``c`` on the Hessian-vector product's ``grad_outputs`` (module doc).

    ``scale``: c, a power of two in [MIN_SCALE, 1]. Per Hessian-vector product, at most
    ``RETRIES`` back-offs by ``BACKOFF`` (so one step covers a factor 2^16 of overflow);
    a step whose Hz is still non-finite is skipped (``skipped_steps``), and ``c`` stays
    backed off for the next one. After ``GROWTH_INTERVAL`` Hessian steps in a row with
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

    def finished(self, ok: bool) -> None:
        """Record a Hessian step's outcome: ``ok`` (its Hz were finite) or skipped."""
        if not ok:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.consecutive_skips >= 2 and self.consecutive_skips & (self.consecutive_skips - 1) == 0:
                warnings.warn(
                    f"AdaHessian: {self.consecutive_skips} Hessian steps in a row skipped "
                    f"because the Hessian-vector products were not finite even at a factor "
                    f"{self.scale:g} below the loss scale: the curvature itself overflows "
                    "(check the loss and the learning rate), or the model produces inf/NaN.",
                    stacklevel=4,
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
