"""The functional core: AdaHessian's math on lists of tensors, one implementation per
backend (:mod:`adahessian.backends`) behind one entry point per operation, the shape of
``torch.optim.adam``; and its input type, the Hutchinson data of a Hessian step
(:class:`Estimate`).

The optimizer class gathers the lists; these functions never look at ``param_groups``,
optimizer state or loss scales (the caller unscales and decides GradScaler skips:
:mod:`adahessian.amp`). ``backend`` is an implementation (what
:class:`adahessian.backends.Implementations` resolves per device) or the name of one,
"reference" or "fused" (ValueError otherwise); "fused" raises RuntimeError when the
kernels are unavailable for the tensors' device. The math: docs/algorithm.md.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from . import averaging, backends
from .precision import LOW_PRECISION, state_dtype

__all__ = ["LOW_PRECISION", "Difference", "Estimate", "accumulate_hessian_", "adahessian", "sample_rademacher",
           "state_dtype"]


class Difference(NamedTuple):
    """Hz as a finite difference (README, "Without double backward"), unformed: the
    gradients ``ahead`` at theta + eps z and ``behind`` at theta (forward difference) or
    theta - eps z (central), the parameters' shapes and dtype, and ``inv_eps``, 1 / eps or
    1 / (2 eps): ``Hz = (ahead - behind) * inv_eps``, which the kernels form as they read
    both (in the state dtype)."""

    ahead: list[Tensor]
    behind: list[Tensor]
    inv_eps: float

    def select(self, ns: list[int]) -> Difference:
        return Difference([self.ahead[n] for n in ns], [self.behind[n] for n in ns], self.inv_eps)


class Estimate(NamedTuple):
    """A Hessian step's Hutchinson data, aligned with the step's parameter list: the
    last sample's z (the parameters' dtype) and its sampler keys, its Hz (unscaled; None
    when ``difference`` holds its operands), and the sum of ``z * Hz`` over the earlier
    samples (the state dtype; None when ``n_samples == 1``)."""

    zs: list[Tensor]
    keys: list[int]
    hzs: list[Tensor] | None
    partial_sums: list[Tensor] | None
    difference: Difference | None = None

    def select(self, ns: list[int]) -> Estimate:
        """The estimate of the parameters at positions ``ns``."""
        pick = [self.zs, self.keys, self.hzs, self.partial_sums]
        return Estimate(*(None if xs is None else [xs[n] for n in ns] for xs in pick),
                        None if self.difference is None else self.difference.select(ns))

    def tensors(self) -> list[Tensor]:
        """The tensors that distributed training averages across ranks (both gradients of
        a difference: the average of the differences is the difference of the averages)."""
        products = self.hzs if self.difference is None else self.difference.ahead + self.difference.behind
        return products + (self.partial_sums or [])


def sample_rademacher(like: list[Tensor], keys: list[int], *, backend) -> list[Tensor]:
    """One Rademacher vector per tensor of ``like``: its shape, dtype and device, entries
    ±1 from the pinned sampler (docs/algorithm.md, section 2) with sampler key ``keys[i]``
    (:func:`adahessian.sampler.rademacher_key`). Bitwise the same on every backend."""
    return backends.implementation(backend).sample_rademacher(like, keys)


def accumulate_hessian_(
    acc: list[Tensor], zs: list[Tensor], hzs: list[Tensor] | None, *, keys: list[int] | None = None,
    difference: Difference | None = None, backend,
) -> None:
    """``acc[i] += z_i * Hz_i`` for one Hutchinson sample, in place. ``acc``: the state
    dtype of the parameters (:func:`state_dtype`); ``zs``, ``hzs``: the parameters' shapes
    and dtype. With ``difference`` (``hzs`` None), Hz is its quotient, formed in the state
    dtype. The fused kernels regenerate z from its sampler ``keys`` rather than read ``zs``
    (ValueError when the fused backend gets no ``keys``). Bitwise the same on every
    backend."""
    backends.implementation(backend).accumulate_hessian_(acc, zs, hzs, keys, difference)


def adahessian(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_diag_sqs: list[Tensor],
    hessians: list[Tensor | None],
    state_steps: list[int],
    *,
    estimate: Estimate | None,
    n_samples: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    average_conv_kernel: bool,
    spatial_averaging: str = "conv2d",
    block_length: int = 1,
    backend,
) -> None:
    """One AdaHessian update of every tensor in ``params``, in place (docs/algorithm.md,
    section 1, steps 1-5).

    ``grads``: the parameters' shapes and dtypes, unscaled. ``exp_avgs``,
    ``exp_hessian_diag_sqs`` (m, v) and ``hessians`` (D, kept between Hessian steps):
    the state dtype (:func:`state_dtype`); ``hessians`` is all tensors or all None
    (ValueError otherwise). ``state_steps``: each parameter's step count *after* this
    step (ints >= 1).

    A Hessian step passes ``estimate`` (:class:`Estimate`, aligned with ``params``, Hz
    unscaled or a finite difference's operands): ``D = (partial_sums + z * Hz) /
    n_samples``, written into ``hessians`` when they are kept. Other steps pass None and
    use ``hessians`` as D.

    ``average_conv_kernel``, ``spatial_averaging`` and ``block_length`` select which
    elements share one mean |D| (:class:`adahessian.averaging.Averaging`, its rule per
    shape derived once and cached); ValueError for settings that do not combine or a
    tensor they refuse (a 5-D one with "official", a size that ``block_length`` does not
    divide), before any tensor changes.
    """
    kept = [h is not None for h in hessians]
    if any(kept) and not all(kept):
        raise ValueError("adahessian(): hessians must be all tensors or all None (D is kept for every parameter or none)")
    if estimate is None and not all(kept):
        raise ValueError("adahessian(): a step without an estimate uses the kept D: pass hessians")
    rules = averaging.Averaging.of(average_conv_kernel, spatial_averaging, block_length).rules(params)
    backends.implementation(backend).step_(
        params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, estimate=estimate,
        n_samples=n_samples, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        hessian_power=hessian_power, rules=rules,
    )
