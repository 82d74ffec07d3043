"""Exact trajectories: on separable objectives z * Hz = diag(H) for every z, so the
optimizer must follow the float64 re-derivation of SPEC section 3 step for step."""

import pytest
import torch

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


def assert_trajectories_close(got, want, rtol=1e-10, atol=1e-12):
    assert len(got) == len(want)
    for step, (ps, qs) in enumerate(zip(got, want)):
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p.double(), q, rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {m}")


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
    got, _ = run(problem, STEPS, dtype=torch.float32, weight_decay=0.01, backend=backend)
    want = oracle_trajectory(problem, [dict(DEFAULT, weight_decay=0.01)] * len(SHAPES), STEPS)
    assert_trajectories_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_float32_state(dtype, backend):
    problem = Separable(SHAPES, seed=6, dtype=dtype)
    got, opt = run(problem, 4, dtype=dtype, update_each=2, backend=backend)
    for p in (p for g in opt.param_groups for p in g["params"]):
        assert p.dtype == dtype
        state = opt.state[p]
        assert {state[k].dtype for k in ("exp_avg", "exp_hessian_diag_sq", "hessian")} == {torch.float32}
    want = oracle_trajectory(problem, [DEFAULT] * len(SHAPES), 4, update_each=2)
    # One rounding of p per step (and of grad/Hz, computed in the low dtype).
    assert_trajectories_close(got, want, rtol=2e-2, atol=2e-2)
