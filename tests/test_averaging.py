"""Spatial averaging (adahessian/averaging.py; README, "Arguments"): the official
implementation's rule (spatial_averaging="official") and its fairseq version's blocks
(block_length), against the float64 re-derivation of tests/oracle.py on both backends,
the fused kernels against the reference per dtype (CUDA's code: tests/test_cuda.py), and
the errors for shapes a setting refuses."""

import copy

import pytest
import torch

import cases
from adahessian import AdaHessian, averaging
from oracle import Separable, oracle_average, oracle_trajectory
from test_exact import DEFAULT, assert_trajectories_close, run

STEPS = 6


@pytest.mark.parametrize("case", list(cases.AVERAGING_OPTIONS))
def test_trajectory_matches_float64_oracle(case, backend):
    options = cases.AVERAGING_OPTIONS[case]
    problem = Separable(cases.averaging_shapes(options), seed=11)
    got, _ = run(problem, STEPS, backend=backend, update_each=2, **options)
    want = oracle_trajectory(problem, [DEFAULT] * len(problem.init), STEPS, update_each=2, **options)
    assert_trajectories_close(got, want)
    # The averaging changed the run: it differs from the per-element one (bar blocks of 1).
    plain = oracle_trajectory(problem, [DEFAULT] * len(problem.init), STEPS, update_each=2)
    moved = any(not torch.allclose(g, p) for g, p in zip(got[-1], plain[-1]))
    assert moved == (options.get("block_length", 1) > 1 or "spatial_averaging" in options)


@pytest.mark.parametrize("case", list(cases.AVERAGING_OPTIONS))
def test_kept_d_is_the_oracle_average(case, backend):
    options = cases.AVERAGING_OPTIONS[case]
    problem = Separable(cases.averaging_shapes(options), seed=12)
    _, opt = run(problem, 1, backend=backend, update_each=3, **options)
    for n, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        d = problem.hess_diag(n, problem.init[n])
        torch.testing.assert_close(opt.state[p]["hessian"], oracle_average(d, **options), rtol=1e-14, atol=0)


def test_the_official_rule_groups():
    rule = lambda shape: averaging.rule_of(shape, average_conv_kernel=False, spatial_averaging="official",  # noqa: E731
                                           block_length=1)
    assert rule((8, 4, 3, 3)).group == 9 and rule((8, 4, 5)).group == 5 and rule((6, 7)).group == 7
    assert rule((7,)).group == 1 and rule(()).group == 1
    conv2d = averaging.rule_of((8, 4, 5), average_conv_kernel=True, spatial_averaging="conv2d", block_length=1)
    assert conv2d is None  # Conv1d weights stay per element under the default rule


@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=cases.dtype_name)
@pytest.mark.parametrize("case", list(cases.AVERAGING_OPTIONS))
@pytest.mark.parametrize("core", cases.AVERAGING_CORES)
def test_fused_matches_the_reference(dtype, case, core, fused_kernels):
    cases.averaging_step_matches(dtype, case, core)


def _step(backend, shapes, **options):
    problem = Separable(shapes, seed=13)
    return run(problem, 1, backend=backend, **options)


def test_a_block_that_does_not_divide_a_size_is_refused_at_step(backend):
    with pytest.raises(ValueError, match=r"block_length=32.*shape \(5, 3\) has 15 elements.*e\.g\. 1"):
        _step(backend, [(32,), (5, 3)], block_length=32)


def test_a_refused_step_changes_nothing(backend):
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 32)), torch.nn.Parameter(torch.linspace(1, 2, 15).view(5, 3))]
    opt = AdaHessian(params, backend=backend)

    def backward():
        opt.zero_grad()
        sum((p**4).sum() for p in params).backward(create_graph=True)

    backward()
    opt.step()
    backward()
    before = copy.deepcopy((opt.state_dict(), [p.detach() for p in params], [p.grad.detach() for p in params]))
    opt.block_length = 4  # (5, 3) has 15 elements
    with pytest.raises(ValueError, match=r"the optimizer's parameter 1 \(in param group 0\) of shape \(5, 3\)"):
        opt.step()
    after = (opt.state_dict(), [p.detach() for p in params], [p.grad.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(before[1] + before[2], after[1] + after[2]))
    assert [s["step"] for s in after[0]["state"].values()] == [s["step"] for s in before[0]["state"].values()] == [1, 1]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before[0]["state"].values(), after[0]["state"].values())
               for k in a if torch.is_tensor(a[k]))


def test_the_step_checks_each_shape_once_per_setting(monkeypatch, backend):
    # The rules are derived once per settings value and shape (the optimizer's check,
    # before the step changes anything, and the functional core share them): not a
    # per-step cost, on either backend.
    checked = []
    real = averaging.rule_of
    monkeypatch.setattr(averaging, "rule_of", lambda shape, **k: checked.append(shape) or real(shape, **k))
    monkeypatch.setattr(averaging, "_RULES", {})  # derived afresh for this test
    params = [torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(2, 4))]
    opt = AdaHessian(params, backend=backend)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            sum((p**4).sum() for p in params).backward(create_graph=True)
            opt.step()

    steps(3)
    assert len(checked) == len(params)
    opt.block_length = 4
    checked.clear()
    steps(2)
    assert len(checked) == len(params)


def test_the_official_rule_refuses_5d_tensors(backend):
    with pytest.raises(ValueError, match=r"'official'.*\(2, 2, 2, 2, 4\) is 5-D"):
        _step(backend, [(2, 2, 2, 2, 4)], spatial_averaging="official")


def test_the_kernel_refuses_groups_that_do_not_tile_the_tensor(fused_kernels):
    # The kernels apply the groups they are given; a layout that does not tile the
    # tensor, a negative group or a list not one per parameter is a caller's error.
    p = [torch.zeros(5, 3)]
    args = (p, [torch.zeros(5, 3)], [torch.zeros(5, 3)], [torch.zeros(5, 3)], [torch.zeros(5, 3)], [], [], [], [], [1],
            0.1, 0.9, 0.999, 1e-8, 0.0, 1.0, 1, 1.0)
    with pytest.raises(ValueError, match=r"groups of 4 elements do not tile a parameter of shape \[5, 3\] \(15 "):
        torch.ops.adahessian.fused_step_(*args, groups=[4])
    with pytest.raises(ValueError, match=r"group -1 for a parameter of shape \[5, 3\]: pass 0"):
        torch.ops.adahessian.fused_step_(*args, groups=[-1])
    for groups in ([], [3, 3]):
        with pytest.raises(ValueError, match=f"groups has {len(groups)} entries, params 1: pass one group size per"):
            torch.ops.adahessian.fused_step_(*args, groups=groups)
    torch.ops.adahessian.fused_step_(*args, groups=[15])  # groups that tile it: accepted


@pytest.mark.parametrize("options,message", [
    (dict(spatial_averaging="blocks"), "Invalid spatial_averaging"),
    (dict(block_length=0), "Invalid block_length"),
    (dict(block_length=4, average_conv_kernel=True), "does not combine"),
    (dict(block_length=4, spatial_averaging="official"), "does not combine"),
])
def test_bad_settings_are_refused_at_construction_and_at_step(options, message):
    with pytest.raises(ValueError, match=message):
        AdaHessian([torch.nn.Parameter(torch.zeros(4))], **options)
    with pytest.raises(ValueError, match="Invalid block_length"):
        AdaHessian([torch.nn.Parameter(torch.zeros(4))], block_length=True)
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdaHessian([p], backend="reference")
    for name, value in options.items():
        setattr(opt, name, value)
    p.grad = torch.zeros(4)
    with pytest.raises(ValueError, match=message):
        opt.step()


@pytest.mark.parametrize("change", [dict(spatial_averaging="official"), dict(block_length=4)])
def test_a_change_makes_the_next_step_a_hessian_step_and_is_saved(change):
    p = torch.nn.Parameter(torch.ones(8))
    opt = AdaHessian([p], update_each=5, backend="reference")
    (p**2).sum().backward(create_graph=True)
    opt.step()
    assert not opt.hessian_due
    for name, value in change.items():
        setattr(opt, name, value)
    assert opt.hessian_due
    saved = opt.state_dict()["param_groups"][0]
    assert all(saved[name] == value for name, value in change.items())
    fresh = AdaHessian([torch.nn.Parameter(torch.ones(8))], update_each=5, backend="reference")
    fresh.load_state_dict(opt.state_dict())
    assert all(getattr(fresh, name) == value for name, value in change.items())


def test_functional_defaults_are_the_seed_behaviour():
    # spatial_averaging and block_length default to today's rule in functional.adahessian.
    lists, estimate = cases.problem(torch.float64, hessian_step=True, kept=False, n_samples=1, channels_last=False)
    options = cases.core_options(1, 1.0, True)
    a = cases.run_functional("reference", lists, estimate, **options)
    b = cases.run_functional("reference", lists, estimate, **options, spatial_averaging="conv2d", block_length=1)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


def test_a_state_dict_saved_without_the_settings_loads_with_the_defaults():
    p = torch.nn.Parameter(torch.ones(8))
    opt = AdaHessian([p], backend="reference")
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["spatial_averaging"], group["block_length"]
    fresh = AdaHessian([torch.nn.Parameter(torch.ones(8))], backend="reference")
    fresh.load_state_dict(saved)
    assert fresh.spatial_averaging == "conv2d" and fresh.block_length == 1
