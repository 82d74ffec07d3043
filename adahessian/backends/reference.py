"""The reference implementation: docs/algorithm.md, section 1, written out with the
original implementation's per-tensor in-place operations, in its order. The oracle the
fused kernels are tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import sampler
from ..precision import state_dtype


def sample_rademacher(like: list[Tensor], keys: list[int]) -> list[Tensor]:
    return [sampler.rademacher(t.shape, k, dtype=t.dtype, device=t.device) for t, k in zip(like, keys)]


def accumulate_hessian_(acc: list[Tensor], zs: list[Tensor], hzs: list[Tensor], keys: list[int]) -> None:
    for a, z, hz in zip(acc, zs, hzs):
        a.add_(z.to(a.dtype) * hz.to(a.dtype))


def step_(
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, *, estimate, n_samples, lr, beta1,
    beta2, eps, weight_decay, hessian_power, average_conv_kernel,
) -> None:
    for i, param in enumerate(params):
        dtype = state_dtype(param)
        p = param if param.dtype == dtype else param.to(dtype)
        grad = grads[i].to(dtype)
        exp_avg, exp_hessian_diag_sq = exp_avgs[i], exp_hessian_diag_sqs[i]

        # 1. D: this step's Hutchinson estimate, or the one kept from the last Hessian step.
        if estimate is not None:
            hess = estimate.zs[i].to(dtype) * estimate.hzs[i].to(dtype)
            if estimate.partial_sums is not None:
                hess = estimate.partial_sums[i] + hess
            if n_samples > 1:
                hess = hess / n_samples
        else:
            hess = hessians[i]

        # 2. Conv kernels share one curvature value per (out, in) channel pair.
        if average_conv_kernel and p.dim() == 4:
            hess = torch.abs(hess).mean(dim=[2, 3], keepdim=True).expand_as(p).clone()
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
