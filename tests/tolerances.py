"""Tolerances derived from the arithmetic, not from what one CPU printed.

Two kinds of comparison, and the error model behind each.

**One step from identical state** (float32, bfloat16, float16; `assert_step_close`).
Both paths start from bit-identical parameters, moments, D and gradient, take one
update (docs/algorithm.md, section 1, steps 3-5) and are compared elementwise. Write u
for the unit round-off of the compute dtype c (float32 for bfloat16/float16
parameters; u = 2^-24 for float32, 2^-53 for float64). Every +, -, *, / and sqrt is correctly rounded
(relative error <= u); a fused multiply-add only drops a rounding; the coefficients
(1 - lr wd, b1, 1 - b1, b2, 1 - b2, bc2, -lr/bc1, eps, hp/2) are formed in double and
rounded to c once (<= u each); pow is within POW_ULPS ulp (<= 2 POW_ULPS u). With
a = hp/2, s = lr/bc1, M = b1|m_old| + (1-b1)|g|, first order in u, each path's value is
within these bounds of the exact one:

  m  = b1 m_old + (1-b1) g           dm = 3u M   (coefficient + product per term, one
                                                  sum; M, not |m|: the terms may cancel)
  v  = b2 v_old + (1-b2) D D         dv = (4u + 2 d_D) v   (non-negative terms: relative;
                                                  2 roundings + 1 sum + 1 coefficient)
  r  = (v / bc2)^a                   dr = [a (dv/v + 2u) + 2 POW_ULPS u + |fl(a) - a| |ln v/bc2|] r
  den = r + eps                      dden = dr + 2u den
  delta = -s m / den                 ddelta = (s/den) dm + |delta| (3u + dden/den)
  p' = p (1 - lr wd) + delta         dp = u |p'| + 2u |p (1 - lr wd)| + ddelta

D is the same tensor in both paths (z from the pinned sampler and Hz from the same
autograd call, or from a finite difference the same two gradients differenced and
scaled by 1/eps in c, one rounding each, in that order on both paths; the sum over samples, / n_samples and the power-of-two unscaling
(GradScaler's scale, the HVP's own factor) are the same correctly rounded operations in the same order, and
test_*accumulate*/test_rademacher* check that bitwise), except for conv-kernel
averaging: a mean of k = kh*kw non-negative |D| in an order each implementation
chooses, d_D = k u |D| ((k - 1) u for the sum, u for the division). For
bfloat16/float16 parameters each path rounds its float32 p' to the parameter dtype once:
+ u_p |p'| per path (so two paths may land one ulp apart), u_p that dtype's round-off.
An underflow floor of finfo.tiny (u_p * tiny for the stored rounding) is added to every
absolute bound. Two paths agree within the sum of their bounds; an exact float64 oracle
counts as a path with u = 2^-53. Inputs that differ between the compared sides (a
float32 autograd gradient against the oracle's exact one) enter as `grad_err`
(absolute, on g) and `hessian_err` (relative, on D), propagated by the same formulas.
The neglected second-order terms are products of the relative bounds above (dv/v,
dr/r, dden/den, ...); their sum T stays below 0.2 in every test (the largest: bfloat16
against the oracle, 2 x 4 x 2^-8 ~ 0.03), and (e^T - 1) / T < 1.25 for T < 0.2: bounds
are multiplied by SECOND_ORDER = 1.25.

**Trajectories over N steps** (float64 only; `assert_trajectory_close`). Per step, the
two paths' roundings move p apart by at most K_STEP * eps64 * ||p||_inf, eps64 = 2^-52:
the per-step bound above, evaluated on every step of the float32 per-step cases of
tests/test_fused.py, is <= 48 eps ||p'||_inf for both paths together (early steps,
where |delta| ~ lr is large against |p|), so K_STEP = 64. Later steps carry an earlier
deviation forward with a gain that belongs to the model and the run, not the machine
(the conditioning of the training map; rounding only seeds it): injecting uniform noise
of K_STEP eps64 ||p||_inf into every parameter after every step of each
TRAJECTORIES case (8 noise seeds, noise sizes 1e-2..1e2 x that: the response is
linear) moves the final parameters by at most 5.5e3 x N K_STEP eps64 ||p||_inf, the
worst being mlp-grad-scaler's last bias, whose curvature estimate nearly vanishes on
some steps (most cases stay below 1e2). The float64 comparisons of the tests come out
within 2e-5 of the resulting bound.
AMPLIFICATION = 1e5 bounds that gain with a margin of 18. Parameters whose exact
gradient is zero (m / sqrt(v) of pure round-off: unbounded gain) are compared per step
instead (docs/algorithm.md, section 4). So after N steps: |got - want| <=
AMPLIFICATION * N * K_STEP * eps64 * ||want||_inf, a normwise bound per tensor (an element that crosses zero is
not held to its own magnitude); 3.4e-8 ||want||_inf after 24 steps. The same gain in
float32 (2^29 times the round-off) allows O(1) deviations: no test compares float32
trajectories.
"""

from __future__ import annotations

import math

import torch

POW_ULPS = 4  # CUDA's powf (4 ulp); Sleef's vectorised pow_u10 and glibc's pow are <= 1 ulp
SECOND_ORDER = 1.25
K_STEP = 64
AMPLIFICATION = 1e5
LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in LOW_PRECISION else dtype


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _path_bounds(x, *, u=0.0, u_store=0.0, tiny_store=0.0, tiny=0.0, exp_err=0.0, grad_err=0.0, hessian_err=0.0,
                 group=1):
    """One side's absolute error bounds on (p', m, v, D) (the module docstring's model);
    with u = 0, the propagated difference of the inputs alone."""
    d_d = group * u if group > 1 else 0.0
    dm = 3 * u * x["M"] + (1 - x["beta1"]) * grad_err + tiny
    dv_rel = 4 * u + 2 * (d_d + hessian_err)
    log_term = torch.where(x["v_hat"] > 0, x["v_hat"].clamp_min(1e-300).log().abs(), 0.0)
    dr = (x["a"] * (dv_rel + 2 * u) + 2 * POW_ULPS * u + exp_err * log_term) * x["r"]
    dden = dr + 2 * u * x["den"]
    ddelta = x["s"] / x["den"] * dm + x["delta"] * (3 * u + dden / x["den"])
    dp = u * x["p_new"] + 2 * u * x["p_decayed"] + ddelta + u_store * x["p_new"] + u_store * tiny_store + tiny
    return dict(param=dp, exp_avg=dm, exp_hessian_diag_sq=dv_rel * x["v"] + tiny, hessian=(d_d + hessian_err) * x["D"])


def step_bounds(want, before, grad, hyper, *, dtypes, group=1, grad_err=0.0, hessian_err=0.0):
    """Elementwise bounds on |got - want| for one update: the sum of each compared
    side's bound (``dtypes``: the parameter dtype of each side, float64 for an exact
    oracle) plus the propagated input differences. ``want``: the reference side's
    tensors after the step (param, exp_avg, exp_hessian_diag_sq, optional hessian);
    ``before``: param and exp_avg before it; ``grad``: the unscaled gradient;
    ``hyper``: lr, beta1, beta2, eps, weight_decay, hessian_power, step; ``group``:
    the conv-kernel averaging group (kh*kw, or 1)."""
    f64 = lambda t: t.detach().double().abs()  # noqa: E731
    b1, b2, step = hyper["beta1"], hyper["beta2"], hyper["step"]
    a = hyper["hessian_power"] / 2
    x = dict(beta1=b1, a=a, M=b1 * f64(before["exp_avg"]) + (1 - b1) * f64(grad), v=f64(want["exp_hessian_diag_sq"]))
    x["v_hat"] = x["v"] / (1 - b2**step)
    x["r"] = x["v_hat"] ** a
    x["den"] = x["r"] + hyper["eps"]
    x["s"] = hyper["lr"] / (1 - b1**step)
    x["delta"] = x["s"] * f64(want["exp_avg"]) / x["den"]
    x["p_decayed"] = f64(before["param"]) * (1 - hyper["lr"] * hyper["weight_decay"])
    x["p_new"] = f64(want["param"])
    x["D"] = f64(want["hessian"]) if want.get("hessian") is not None else torch.zeros_like(x["v"])
    total = _path_bounds(x, grad_err=grad_err, hessian_err=hessian_err)
    for dtype in dtypes:
        c = compute_dtype(dtype)
        store = unit_roundoff(dtype) if dtype != c else 0.0
        exp_err = abs(torch.tensor(a, dtype=c).item() - a)
        side = _path_bounds(x, u=unit_roundoff(c), u_store=store, tiny_store=torch.finfo(dtype).tiny,
                            tiny=torch.finfo(c).tiny, exp_err=exp_err, group=group)
        total = {k: total[k] + side[k] for k in total}
    return {k: SECOND_ORDER * b for k, b in total.items()}


def assert_step_close(got, want, before, grad, hyper, *, dtypes, what="", **model):
    """Every tensor of ``got`` within `step_bounds` of ``want``, element by element."""
    bounds = step_bounds(want, before, grad, hyper, dtypes=dtypes, **model)
    for name, w in want.items():
        if w is None:
            assert got.get(name) is None, f"{what} {name}: expected None"
            continue
        assert_within(got[name], w, bounds[name], f"{what} {name}")


def trajectory_bound(want: torch.Tensor, steps: int) -> torch.Tensor:
    """The normwise bound after ``steps`` float64 steps (module docstring)."""
    assert want.dtype == torch.float64, "trajectories compare in float64"
    scale = want.detach().abs().max() if want.numel() else torch.zeros((), dtype=want.dtype)
    return AMPLIFICATION * steps * K_STEP * torch.finfo(torch.float64).eps * scale.expand_as(want)


def assert_trajectory_close(got, want, steps, what=""):
    assert_within(got, want, trajectory_bound(want, steps), what)


def assert_within(got, want, bound, what=""):
    """|got - want| <= bound elementwise (shapes, dtypes unless ``want`` is a float64
    oracle, and non-finite values must match); on failure, names the worst element
    relative to its bound."""
    same_dtype = got.dtype == want.dtype or want.dtype == torch.float64
    assert got.shape == want.shape and same_dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    b = torch.as_tensor(bound, dtype=torch.float64).cpu().expand_as(w)
    finite = torch.isfinite(w)
    assert torch.equal(torch.isfinite(g), finite) and torch.equal(g[~finite].nan_to_num(), w[~finite].nan_to_num()), (
        f"{what}: non-finite values differ"
    )
    diff = torch.where(finite, (g - w).abs(), 0.0)
    ratio = torch.where(diff > 0, diff / b, 0.0).nan_to_num(posinf=math.inf)
    if w.numel() and ratio.max() > 1:
        i = int(ratio.argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), w.shape))
        raise AssertionError(
            f"{what}: {int((ratio > 1).sum())} of {w.numel()} elements outside the error-model bound; worst at "
            f"{idx}: got {g.flatten()[i].item()!r}, want {w.flatten()[i].item()!r}, |diff| "
            f"{diff.flatten()[i].item():.3g} > bound {b.flatten()[i].item():.3g} ({ratio.max().item():.3g}x)"
        )
