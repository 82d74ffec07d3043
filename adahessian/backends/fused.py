"""The fused implementation: the compiled kernels behind ``torch.ops.adahessian`` (C++
for the CPU in csrc/cpu, CUDA in csrc/cuda, one header of per-element math shared by
both), each op one call for many tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops

NAME = "fused"


def sample_rademacher(like: list[Tensor], keys: list[int]) -> list[Tensor]:
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]
    kernels(out).rademacher_(out, keys)
    return out


def accumulate_hessian_(acc: list[Tensor], zs: list[Tensor], hzs: list[Tensor] | None, keys: list[int] | None,
                        difference) -> None:
    # z is regenerated from its sampler key rather than read (one stream less).
    if keys is None:
        raise ValueError("accumulate_hessian_(backend='fused') regenerates z from the sampler keys: pass keys=")
    operands, bases, inv_eps = (hzs, [], 1.0) if difference is None else difference
    kernels(acc).accumulate_hessian_(acc, operands, bases, keys, inv_eps)


def step_(
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, *, estimate, n_samples, lr, beta1,
    beta2, eps, weight_decay, hessian_power, rules,
) -> None:
    # The kernels are told each tensor's averaging group (0: D per element); the rules
    # (adahessian/averaging.py) have already refused the shapes the settings refuse. The
    # kernel keeps D for all tensors or none; the optimizer's state is consistent.
    difference = None if estimate is None else estimate.difference
    kernels(params).fused_step_(
        params, grads, exp_avgs, exp_hessian_diag_sqs, hessians if hessians and hessians[0] is not None else [],
        hzs=[] if estimate is None else estimate.hzs if difference is None else difference.ahead,
        bases=[] if difference is None else difference.behind,
        inv_step=1.0 if difference is None else difference.inv_eps,
        partial_sums=[] if estimate is None or estimate.partial_sums is None else estimate.partial_sums,
        keys=[] if estimate is None else estimate.keys, steps=state_steps, n_samples=n_samples, lr=lr,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
        groups=[0 if rule is None else rule.group for rule in rules],
    )


def kernels(tensors: list[Tensor]):
    """torch.ops.adahessian, loaded for the device type of ``tensors``."""
    return _ops.ops(tensors[0].device.type if tensors else "cpu")
