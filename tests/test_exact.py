"""Exact trajectories: on separable objectives z * Hz = diag(H) for every z, so the
optimizer must follow the float64 re-derivation of docs/algorithm.md (section 1) step for
step: float64 runs over the whole run, float32 and low precision per step
(tests/tolerances.py)."""

import pytest
import torch

import tolerances
from adahessian import AdaHessian
from oracle import Separable, oracle_trajectory

STEPS = 12
SHAPES = [(5, 3), (7,), (4, 2, 3, 3), (3, 2, 1, 1)]  # a 1x1 conv: averaging takes |D|
DEFAULT = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, hessian_power=1.0)


def run(problem, steps, *, groups=None, closure=False, due_backward=False, dtype=torch.float64, **kwargs):
    params = [torch.nn.Parameter(w.clone().to(dtype)) for w in problem.init]
    spec = [dict(params=[p], **g) for p, g in zip(params, groups)] if groups else params
    opt = AdaHessian(spec, **kwargs)
    history = []
    for _ in range(steps):
        def compute():
            opt.zero_grad()
            loss = problem.loss(params)
            loss.backward(create_graph=opt.hessian_due if due_backward else True)
            return loss

        if closure:
            loss = opt.step(compute)
            assert torch.is_tensor(loss)
        else:
            compute()
            opt.step()
        history.append([p.detach().clone() for p in params])
    return history, opt


def assert_trajectories_close(got, want):
    """A float64 run against the float64 oracle after every step (tests/tolerances.py)."""
    assert len(got) == len(want)
    for step, (ps, qs) in enumerate(zip(got, want)):
        for i, (p, q) in enumerate(zip(ps, qs)):
            tolerances.assert_trajectory_close(p, q, step + 1, f"step {step} tensor {i}")


# How far autograd's gradient and Hz of Separable.loss, computed in the parameter's dtype
# (unit round-off u), can be from the exact ones. g = (a/2)(2w) + (b/4)(4 w^3) + c:
# a/2, b/4, 2w, 4(.) and the products with 1 and c are exact; (a/2)(2w) rounds once,
# w^3 twice (two products, or pow within 1 ulp), (b/4)(4 w^3) once, and the three terms
# are summed with two roundings: |dg| <= 5u (|a w| + |b w^3| + |c|). Hz = a z + 3 b w^2 z:
# a z is exact; w^2, 3(w^2) and the product with b z round once each, and the sum once:
# D = z Hz = a + 3 b w^2 (positive terms) within 4u D.
GRAD_ROUNDINGS, HESSIAN_ROUNDINGS = 5, 4


def assert_steps_follow_the_oracle(problem, dtype, steps, hyper, *, update_each, backend):
    """Each step of a run in ``dtype`` against the float64 re-derivation of docs/algorithm.md
    (section 1) taken from the run's own state before it, with the exact gradient and D at its
    parameters, within tests/tolerances.py's bound plus autograd's error on g and D."""
    params = [torch.nn.Parameter(w.clone().to(dtype)) for w in problem.init]
    b1, b2 = hyper["betas"]
    opt = AdaHessian(params, update_each=update_each, backend=backend, **hyper)
    u = tolerances.unit_roundoff(dtype)
    keys = ("exp_avg", "exp_hessian_diag_sq", "hessian")
    for t in range(steps):
        before = [{k: opt.state[p].get(k, torch.zeros_like(p)).double().clone() for k in keys} for p in params]
        ws = [p.detach().double().clone() for p in params]
        hessian_step = opt.hessian_due
        opt.zero_grad()
        problem.loss(params).backward(create_graph=hessian_step)
        opt.step()
        for n, (p, w, s) in enumerate(zip(params, ws, before)):
            state = opt.state[p]
            assert {state[k].dtype for k in ("exp_avg", "exp_hessian_diag_sq")} == {tolerances.compute_dtype(dtype)}
            a, b, c = (x.double() for x in problem.coeffs[n])
            g, d = problem.grad(n, w), problem.hess_diag(n, w) if hessian_step else s["hessian"]
            m = b1 * s["exp_avg"] + (1 - b1) * g
            v = b2 * s["exp_hessian_diag_sq"] + (1 - b2) * d * d
            k = state["step"]
            denom = (v / (1 - b2**k)) ** (hyper["hessian_power"] / 2) + hyper["eps"]
            want = dict(param=w * (1 - hyper["lr"] * hyper["weight_decay"]) - hyper["lr"] / (1 - b1**k) * m / denom,
                        exp_avg=m, exp_hessian_diag_sq=v, hessian=d if "hessian" in state else None)
            tolerances.assert_step_close(
                {key: state.get(key) for key in want} | dict(param=p), want, dict(param=w, exp_avg=s["exp_avg"]), g,
                dict(hyper, beta1=b1, beta2=b2, step=k), dtypes=(dtype, torch.float64), what=f"step {t} tensor {n}",
                grad_err=GRAD_ROUNDINGS * u * ((a * w).abs() + (b * w**3).abs() + c.abs()),
                hessian_err=HESSIAN_ROUNDINGS * u if hessian_step else 0.0,
            )
    return params, opt


CASES = {
    "defaults": dict(opt={}, hyper={}),
    "weight_decay": dict(opt=dict(weight_decay=0.05), hyper=dict(weight_decay=0.05)),
    "hessian_power_half": dict(opt=dict(hessian_power=0.5), hyper=dict(hessian_power=0.5)),
    "betas_eps_lr": dict(opt=dict(lr=0.03, betas=(0.8, 0.95), eps=1e-4), hyper=dict(lr=0.03, betas=(0.8, 0.95), eps=1e-4)),
    "update_each": dict(opt=dict(update_each=3), hyper={}, update_each=3),
    "n_samples": dict(opt=dict(n_samples=3), hyper={}),
    "average_conv_kernel": dict(opt=dict(average_conv_kernel=True), hyper={}, average_conv_kernel=True),
    "everything": dict(
        opt=dict(weight_decay=0.01, hessian_power=0.7, update_each=2, n_samples=2, average_conv_kernel=True),
        hyper=dict(weight_decay=0.01, hessian_power=0.7),
        update_each=2,
        average_conv_kernel=True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_float64_oracle(case, backend):
    c = CASES[case]
    problem = Separable(SHAPES, seed=1)
    got, _ = run(problem, STEPS, backend=backend, **c["opt"])
    hyper = dict(DEFAULT, **c["hyper"])
    want = oracle_trajectory(
        problem, [hyper] * len(SHAPES), STEPS,
        update_each=c.get("update_each", 1), average_conv_kernel=c.get("average_conv_kernel", False),
    )
    assert_trajectories_close(got, want)
    # The run moved: a broken optimizer that does nothing cannot pass.
    assert not torch.allclose(got[-1][0], problem.init[0])


def test_param_groups_with_their_own_hyperparameters(backend):
    problem = Separable(SHAPES, seed=2)
    groups = [
        dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.2, betas=(0.5, 0.9), hessian_power=0.5),
        dict(eps=1e-3),
        dict(lr=0.01, weight_decay=0.2, hessian_power=0.3),
    ]
    got, opt = run(problem, STEPS, groups=groups, backend=backend)
    want = oracle_trajectory(problem, [dict(DEFAULT, **g) for g in groups], STEPS)
    assert_trajectories_close(got, want)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.2, 0.1, 0.01]


@pytest.mark.parametrize("closure,due_backward", [(True, False), (False, True), (True, True)])
def test_closure_and_hessian_due_backward(closure, due_backward, backend):
    problem = Separable(SHAPES, seed=3)
    got, _ = run(problem, STEPS, closure=closure, due_backward=due_backward, update_each=4, backend=backend)
    want = oracle_trajectory(problem, [DEFAULT] * len(SHAPES), STEPS, update_each=4)
    assert_trajectories_close(got, want)


def test_hessian_due_follows_the_optimizer_step_counter(backend):
    problem = Separable(SHAPES, seed=4)
    _, opt = run(problem, 0, update_each=3, backend=backend)
    params = [p for g in opt.param_groups for p in g["params"]]
    due = []
    for _ in range(7):
        due.append(opt.hessian_due)
        opt.zero_grad()
        problem.loss(params).backward(create_graph=opt.hessian_due)
        opt.step()
    assert due == [True, False, False, True, False, False, True]


def test_float32_parameters_follow_the_oracle(backend):
    problem = Separable(SHAPES, seed=5, dtype=torch.float32)
    params, _ = assert_steps_follow_the_oracle(
        problem, torch.float32, STEPS, dict(DEFAULT, weight_decay=0.01), update_each=1, backend=backend
    )
    assert not torch.allclose(params[0].double(), problem.init[0].double())


@pytest.mark.parametrize("dtype", tolerances.LOW_PRECISION)
def test_low_precision_parameters_keep_float32_state(dtype, backend):
    # m, v and D stay float32 (checked every step); p is rounded once per step.
    problem = Separable(SHAPES, seed=6, dtype=dtype)
    params, opt = assert_steps_follow_the_oracle(problem, dtype, 4, DEFAULT, update_each=2, backend=backend)
    for p in params:
        assert p.dtype == dtype and opt.state[p]["hessian"].dtype == torch.float32
