"""The functional core: AdaHessian's math on lists of tensors, one implementation per
backend (:mod:`adahessian.backends`) behind one entry point per operation, the shape of
``torch.optim.adam``.

The optimizer class gathers the lists; these functions never look at ``param_groups``,
optimizer state or loss scales (the caller unscales and decides GradScaler skips:
:mod:`adahessian.amp`). ``backend`` is a resolved backend, "reference" or "fused"
(ValueError otherwise); "fused" raises RuntimeError when the kernels are unavailable
for the tensors' device. The math: docs/algorithm.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from . import averaging, backends
from .precision import LOW_PRECISION, state_dtype

if TYPE_CHECKING:
    from .hutchinson import Estimate

__all__ = ["LOW_PRECISION", "accumulate_hessian_", "adahessian", "sample_rademacher", "state_dtype"]


def sample_rademacher(like: list[Tensor], keys: list[int], *, backend: str) -> list[Tensor]:
    """One Rademacher vector per tensor of ``like``: its shape, dtype and device, entries
    ±1 from the pinned sampler (docs/algorithm.md, section 2) with sampler key ``keys[i]``
    (:func:`adahessian.sampler.rademacher_key`). Bitwise the same on every backend."""
    return backends.implementation(backend).sample_rademacher(like, keys)


def accumulate_hessian_(
    acc: list[Tensor], zs: list[Tensor], hzs: list[Tensor], *, keys: list[int] | None = None,
    bases: list[Tensor] | None = None, inv_step: float = 1.0, backend: str,
) -> None:
    """``acc[i] += z_i * Hz_i`` for one Hutchinson sample, in place. ``acc``: the state
    dtype of the parameters (:func:`state_dtype`); ``zs``, ``hzs``: the parameters' shapes
    and dtype. With ``bases`` (the same), Hz is the finite difference ``(hzs_i - bases_i)
    * inv_step``, formed in the state dtype. The fused kernels regenerate z from its
    sampler ``keys`` rather than read ``zs`` (ValueError when ``backend="fused"`` gets no
    ``keys``). Bitwise the same on every backend."""
    if keys is None and backend == "fused":
        raise ValueError("accumulate_hessian_(backend='fused') regenerates z from the sampler keys: pass keys=")
    backends.implementation(backend).accumulate_hessian_(acc, zs, hzs, keys, bases, inv_step)


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
    backend: str,
) -> None:
    """One AdaHessian update of every tensor in ``params``, in place (docs/algorithm.md,
    section 1, steps 1-5).

    ``grads``: the parameters' shapes and dtypes, unscaled. ``exp_avgs``,
    ``exp_hessian_diag_sqs`` (m, v) and ``hessians`` (D, kept between Hessian steps):
    the state dtype (:func:`state_dtype`); ``hessians`` is all tensors or all None
    (ValueError otherwise). ``state_steps``: each parameter's step count *after* this
    step (ints >= 1).

    A Hessian step passes ``estimate`` (:class:`adahessian.hutchinson.Estimate`, aligned
    with ``params``, Hz unscaled, or a finite difference's two gradients and ``1 / step``,
    differenced in the state dtype): ``D = (partial_sums + z * Hz) / n_samples``, written
    into ``hessians`` when they are kept. Other steps pass None and use ``hessians`` as D.

    ``average_conv_kernel``, ``spatial_averaging`` and ``block_length`` select which
    elements share one mean |D| (:mod:`adahessian.averaging`); ValueError for settings
    that do not combine or a tensor they refuse (a 5-D one with "official", a size that
    ``block_length`` does not divide), before any tensor changes.
    """
    kept = [h is not None for h in hessians]
    if any(kept) and not all(kept):
        raise ValueError("adahessian(): hessians must be all tensors or all None (D is kept for every parameter or none)")
    if estimate is None and not all(kept):
        raise ValueError("adahessian(): a step without an estimate uses the kept D: pass hessians")
    averaging.validate(average_conv_kernel, spatial_averaging, block_length)
    rules = [
        averaging.rule_of(tuple(p.shape), average_conv_kernel=average_conv_kernel, spatial_averaging=spatial_averaging,
                          block_length=block_length, what=f"parameter {i}")
        for i, p in enumerate(params)
    ]
    backends.implementation(backend).step_(
        params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, estimate=estimate,
        n_samples=n_samples, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        hessian_power=hessian_power, average_conv_kernel=average_conv_kernel, spatial_averaging=spatial_averaging,
        block_length=block_length, rules=rules,
    )
