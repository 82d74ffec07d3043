"""The functional core: AdaHessian's math on lists of tensors, one implementation per
backend behind one entry point (the shape of ``torch.optim.adam``).

The optimizer class gathers the lists; these functions never look at ``param_groups``
or optimizer state. Every function takes ``backend`` ("reference" or "fused") and
dispatches; the reference bodies below follow SPEC section 3 to the letter, in the
original implementation's order of in-place operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops, sampler

LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param: Tensor) -> torch.dtype:
    """m, v and D of a bfloat16/float16 parameter are float32 (SPEC section 3)."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype


def sample_rademacher(like: list[Tensor], keys: list[int], *, backend: str) -> list[Tensor]:
    """One Rademacher vector per tensor of ``like`` (its shape, dtype and device)."""
    if backend == "reference":
        return [sampler.rademacher(t.shape, k, dtype=t.dtype, device=t.device) for t, k in zip(like, keys)]
    if backend == "fused":
        out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]
        _kernels(out).rademacher_(out, keys)
        return out
    raise _unknown(backend)


def accumulate_hessian_(
    acc: list[Tensor], zs: list[Tensor], hzs: list[Tensor], *, keys: list[int] | None = None, backend: str
) -> None:
    """``acc += z * Hz`` for one Hutchinson sample (every sample but the last). The fused
    kernels regenerate z from its sampler ``keys`` rather than read ``zs`` (one stream less)."""
    if backend == "reference":
        for a, z, hz in zip(acc, zs, hzs):
            a.add_(z.to(a.dtype) * hz.to(a.dtype))
        return
    if backend == "fused":
        if keys is None:
            raise ValueError("accumulate_hessian_(backend='fused') regenerates z from the sampler keys: pass keys=")
        _kernels(acc).accumulate_hessian_(acc, hzs, keys)
        return
    raise _unknown(backend)


def nonfinite(tensors: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor: does any of ``tensors`` hold an inf or a NaN?"""
    if not tensors:
        return torch.tensor(False)
    device = tensors[0].device  # model parallel: one flag per tensor, gathered on one device
    return torch.stack([torch.logical_not(torch.isfinite(t).all()).to(device) for t in tensors]).any()


def adahessian(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_diag_sqs: list[Tensor],
    hessians: list[Tensor | None],
    state_steps: list[int],
    *,
    hzs: list[Tensor] | None,
    zs: list[Tensor] | None,
    keys: list[int] | None,
    partial_sums: list[Tensor] | None,
    n_samples: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
    average_conv_kernel: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    """One AdaHessian update of every tensor in ``params``.

    Hessian step (``hzs`` given): ``D = (partial_sums + z * Hz) / n_samples``, where
    ``partial_sums`` holds ``sum z * Hz`` over the earlier samples (None when
    ``n_samples == 1``); D is written into ``hessians[i]`` when that is not None (the
    state keeps it for the steps in between). Other steps use ``hessians[i]`` as D.
    ``zs`` are the last sample's vectors (the reference path reads them) and ``keys``
    their sampler keys (the fused kernels regenerate z from them, saving a stream).
    ``state_steps`` holds each parameter's step count *after* this step.
    ``grad_scale`` (GradScaler's loss scale) divides grad and Hz; a nonzero
    ``found_inf`` leaves every tensor untouched.
    """
    if backend == "reference":
        if found_inf is not None and bool(found_inf):
            return
        _reference(
            params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps,
            hzs=hzs, zs=zs, partial_sums=partial_sums, n_samples=n_samples, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            average_conv_kernel=average_conv_kernel, grad_scale=grad_scale,
        )
        return
    if backend == "fused":
        _fused(
            params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps,
            hzs=hzs, keys=keys, partial_sums=partial_sums, n_samples=n_samples, lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            average_conv_kernel=average_conv_kernel, grad_scale=grad_scale, found_inf=found_inf,
        )
        return
    raise _unknown(backend)


def _reference(
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, *, hzs, zs, partial_sums,
    n_samples, lr, beta1, beta2, eps, weight_decay, hessian_power, average_conv_kernel, grad_scale,
):
    inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().item()
    for i, param in enumerate(params):
        dtype = state_dtype(param)
        p = param if param.dtype == dtype else param.to(dtype)
        grad = grads[i].to(dtype)
        exp_avg, exp_hessian_diag_sq = exp_avgs[i], exp_hessian_diag_sqs[i]

        # 1. D: this step's Hutchinson estimate, or the one kept from the last Hessian step.
        if hzs is not None:
            hess = zs[i].to(dtype) * hzs[i].to(dtype)
            if partial_sums is not None:
                hess = partial_sums[i] + hess
            if n_samples > 1:
                hess = hess / n_samples
            if inv_scale is not None:
                hess = hess * inv_scale
        else:
            hess = hessians[i]
        if inv_scale is not None:
            grad = grad * inv_scale

        # 2. Conv kernels share one curvature value per (out, in) channel pair.
        if average_conv_kernel and p.dim() == 4:
            hess = torch.abs(hess).mean(dim=[2, 3], keepdim=True).expand_as(p).clone()
        if hzs is not None and hessians[i] is not None:
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


def _fused(
    params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps, *, hzs, keys, partial_sums, **scalars,
):
    # One kernel call for all tensors (torch.ops.adahessian.fused_step_; the scalars go by
    # their schema names); the kernel checks found_inf itself. Its hessians list is all or
    # nothing, so a Hessian step over state restored from a run with another update_each
    # (some D kept, some not) makes one call per kind.
    # GradScaler's scale and found_inf live on one device; each device's call reads its own copy.
    for name in ("grad_scale", "found_inf"):
        if scalars[name] is not None and params:
            scalars[name] = scalars[name].to(params[0].device, non_blocking=True)
    kept = [h is not None for h in hessians]
    if hzs is not None and any(kept) and not all(kept):
        for keep in (True, False):
            idx = [i for i, k in enumerate(kept) if k == keep]
            pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
            _fused(
                *map(pick, (params, grads, exp_avgs, exp_hessian_diag_sqs, hessians, state_steps)),
                hzs=pick(hzs), keys=pick(keys), partial_sums=pick(partial_sums), **scalars,
            )
        return
    _kernels(params).fused_step_(
        params, grads, exp_avgs, exp_hessian_diag_sqs, hessians if all(kept) else [],
        hzs=hzs or [], partial_sums=partial_sums or [], keys=keys or [], steps=state_steps, **scalars,
    )


def _kernels(tensors: list[Tensor]):
    """torch.ops.adahessian, loaded for the device type of ``tensors``."""
    return _ops.ops(tensors[0].device.type if tensors else "cpu")


def _unknown(backend: str) -> ValueError:
    return ValueError(f"unknown AdaHessian backend {backend!r}")
