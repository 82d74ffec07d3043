"""The reference implementation: docs/algorithm.md, section 1, written out with the
original implementation's per-tensor in-place operations, in its order. The oracle the
fused kernels are tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import averaging, sampler
from ..precision import state_dtype

NAME = "reference"


def sample_rademacher(like: list[Tensor], keys: list[int]) -> list[Tensor]:
    return [sampler.rademacher(t.shape, k, dtype=t.dtype, device=t.device) for t, k in zip(like, keys)]


def accumulate_hessian_(acc: list[Tensor], zs: list[Tensor], hzs: list[Tensor] | None, keys: list[int] | None,
                        difference) -> None:
    for i, (a, z) in enumerate(zip(acc, zs)):
        a.add_(z.to(a.dtype) * hessian_vector_product(hzs, difference, i, a.dtype))


def hessian_vector_product(hzs: list[Tensor] | None, difference, i: int, dtype: torch.dtype) -> Tensor:
    """Hz of tensor ``i`` in ``dtype``: ``hzs[i]``, or the finite difference
    ``(ahead[i] - behind[i]) * inv_eps`` (docs/algorithm.md, section 1, step 1)."""
    if difference is None:
        return hzs[i].to(dtype)
    return (difference.ahead[i].to(dtype) - difference.behind[i].to(dtype)) * difference.inv_eps


def step_(
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, *, estimate, n_samples, lr, beta1,
    beta2, eps, weight_decay, hessian_power, rules,
) -> None:
    for i, param in enumerate(params):
        dtype = state_dtype(param)
        p = param if param.dtype == dtype else param.to(dtype)
        grad = grads[i].to(dtype)
        exp_avg, exp_hessian_diag_sq = exp_avgs[i], exp_hessian_diag_sqs[i]

        # 1. D: this step's Hutchinson estimate, or the one kept from the last Hessian step.
        if estimate is not None:
            hz = hessian_vector_product(estimate.hzs, estimate.difference, i, dtype)
            hess = estimate.zs[i].to(dtype) * hz
            if estimate.partial_sums is not None:
                hess = estimate.partial_sums[i] + hess
            if n_samples > 1:
                hess = hess / n_samples
        else:
            hess = hessians[i]

        # 2. Spatial averaging (adahessian/averaging.py): e.g. conv kernels share one
        # curvature value per (out, in) channel pair.
        if rules[i] is not None:
            hess = averaging.mean_abs(hess, rules[i])
        if estimate is not None and hessians[i] is not None:
            hessians[i].copy_(hess)

        # 3. Decoupled weight decay, as in AdamW.
        p.mul_(1 - lr * weight_decay)

        # 4. Moments.
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_hessian_diag_sq.mul_(beta2).addcmul_(hess, hess, value=1 - beta2)

        # 5. Bias correction and the update.
        step = state_steps[i]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_hessian_diag_sq / bias_correction2).pow_(hessian_power / 2).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if p is not param:
            param.copy_(p)
