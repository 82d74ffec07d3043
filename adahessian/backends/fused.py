"""The fused implementation: the compiled kernels behind ``torch.ops.adahessian`` (C++
for the CPU in csrc/cpu, CUDA in csrc/cuda, one header of per-element math shared by
both), each op one call for many tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ops


def sample_rademacher(like: list[Tensor], keys: list[int]) -> list[Tensor]:
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]
    kernels(out).rademacher_(out, keys)
    return out


def accumulate_hessian_(acc: list[Tensor], zs: list[Tensor], hzs: list[Tensor], keys: list[int],
                        bases: list[Tensor] | None, inv_step: float) -> None:
    # z is regenerated from its sampler key rather than read (one stream less).
    kernels(acc).accumulate_hessian_(acc, hzs, bases or [], keys, inv_step)


def step_(
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, *, estimate, n_samples, lr, beta1,
    beta2, eps, weight_decay, hessian_power, average_conv_kernel, spatial_averaging, block_length, rules,
) -> None:
    # The kernels are told each tensor's averaging group (0: none) from `rules`, which
    # have already refused bad shapes; the three settings they came from go unused here.
    # The kernel keeps D for all tensors or none; the optimizer's state is consistent.
    kernels(params).fused_step_(
        params, grads, exp_avgs, exp_hessian_diag_sqs, hessians if hessians and hessians[0] is not None else [],
        hzs=[] if estimate is None else estimate.hzs,
        bases=[] if estimate is None or estimate.bases is None else estimate.bases,
        inv_step=1.0 if estimate is None else estimate.inv_step,
        partial_sums=[] if estimate is None or estimate.partial_sums is None else estimate.partial_sums,
        keys=[] if estimate is None else estimate.keys, steps=state_steps, n_samples=n_samples, lr=lr,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
        groups=[0 if r is None else r.group for r in rules],
    )


def kernels(tensors: list[Tensor]):
    """torch.ops.adahessian, loaded for the device type of ``tensors``."""
    return _ops.ops(tensors[0].device.type if tensors else "cpu")
