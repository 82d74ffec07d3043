"""Independent oracles for the tests: docs/algorithm.md, section 1, re-derived in float64 on a
separable objective, where the Hutchinson estimate is exact for every z."""

from __future__ import annotations

import torch


class Separable:
    """f(w) = sum(a/2 w^2 + b/4 w^4 + c w) per tensor: diag(H) = a + 3 b w^2 and H is
    diagonal, so z * Hz = diag(H) for every Rademacher z."""

    def __init__(self, shapes, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.coeffs = [
            (
                (torch.rand(s, generator=g, dtype=torch.float64) + 0.5).to(dtype),
                (torch.rand(s, generator=g, dtype=torch.float64) * 0.2).to(dtype),
                torch.randn(s, generator=g, dtype=torch.float64).to(dtype),
            )
            for s in shapes
        ]
        self.init = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]

    def loss(self, params):
        return sum((a / 2 * w**2 + b / 4 * w**4 + c * w).sum() for w, (a, b, c) in zip(params, self.coeffs))

    def grad(self, n, w):
        a, b, c = (t.double() for t in self.coeffs[n])
        return a * w + b * w**3 + c

    def hess_diag(self, n, w):
        a, b, _ = (t.double() for t in self.coeffs[n])
        return a + 3 * b * w**2


def oracle_average(d, *, average_conv_kernel=False, spatial_averaging="conv2d", block_length=1):
    """D after spatial averaging (README, "Arguments"), in float64, written out plainly:
    each element replaced by the mean |D| of the elements that share its curvature."""
    if block_length > 1:
        blocks = d.abs().flatten().split(block_length)
        assert all(b.numel() == block_length for b in blocks)
        return torch.cat([b.mean().expand(block_length) for b in blocks]).view(d.shape)
    if spatial_averaging == "official":
        assert d.dim() <= 4
        if d.dim() <= 1:
            return d.abs()
        # 4-D: each (out, in) kernel; 3-D: each (out, in) row of the last dim; 2-D: each row.
        last = 2 if d.dim() >= 3 else 1
        return d.abs().mean(dim=tuple(range(last, d.dim())), keepdim=True).expand_as(d)
    if average_conv_kernel and d.dim() == 4:
        return d.abs().mean(dim=(2, 3), keepdim=True).expand_as(d)
    return d


def oracle_trajectory(problem, hypers, steps, *, update_each=1, **averaging):
    """docs/algorithm.md, section 1, in float64, written out plainly. ``hypers[n]`` holds the
    per-parameter lr, betas, eps, weight_decay, hessian_power. Returns the
    parameters after every step."""
    ws = [w.double().clone() for w in problem.init]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    d = [None] * len(ws)
    history = []
    for t in range(steps):
        for n, w in enumerate(ws):
            h = hypers[n]
            g = problem.grad(n, w)
            if t % update_each == 0:
                d[n] = problem.hess_diag(n, w)
            dn = oracle_average(d[n], **averaging)
            b1, b2 = h["betas"]
            w = w * (1 - h["lr"] * h["weight_decay"])
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * dn**2
            k = t + 1
            denom = (v[n] / (1 - b2**k)) ** (h["hessian_power"] / 2) + h["eps"]
            ws[n] = w - h["lr"] / (1 - b1**k) * m[n] / denom
        history.append([w.clone() for w in ws])
    return history
