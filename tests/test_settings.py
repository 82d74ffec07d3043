"""Optimizer-wide settings changed between runs or between steps: the state adapts and
no parameter is silently skipped (README, "Changing settings")."""

import copy

import pytest
import torch

from adahessian import AdaHessian, backends, functional


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 2))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, generator=g)


def _steps(model, opt, first, count):
    """Train ``count`` steps on batches ``first``, ``first + 1``, ...; per step, which
    parameters moved and whether it was a Hessian step."""
    record = []
    for step in range(first, first + count):
        before = [p.detach().clone() for p in model.parameters()]
        due = opt.hessian_due
        x, y = _batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward(create_graph=due)
        opt.step()
        record.append((due, [not torch.equal(b, p) for b, p in zip(before, model.parameters())]))
    return record


def _every_parameter_moves_on_every_step(record):
    return all(all(moved) for _, moved in record)


CHANGES = [
    dict(update_each=3),
    dict(update_each=4),
    dict(update_each=2, n_samples=3),
    dict(average_conv_kernel=True, update_each=2),
    dict(update_each=1),
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_a_change_on_a_live_optimizer_matches_a_fresh_run_with_the_new_settings(backend, change):
    model = _model()
    opt = AdaHessian(model.parameters(), lr=0.02, update_each=2, n_samples=2, backend=backend)
    _steps(model, opt, 0, 5)  # step 5 is not a Hessian step under the old settings
    for name, value in change.items():
        setattr(opt, name, value)
    assert opt.hessian_due  # the next step recomputes D, as a fresh run's first step does
    record = _steps(model, opt, 5, 9)
    assert _every_parameter_moves_on_every_step(record), record
    every = change.get("update_each", 2)
    assert [due for due, _ in record] == [i % every == 0 for i in range(9)]
    # The state is what a fresh run with the new settings keeps.
    for p in model.parameters():
        assert ("hessian" in opt.state[p]) == (every > 1)
    if change.get("average_conv_kernel"):  # the kept D of the conv kernel is averaged now
        d = opt.state[model[0].weight]["hessian"]
        assert torch.equal(d, d[:, :, :1, :1].expand_as(d)) and (d > 0).all()


def test_resume_then_change(backend):
    model = _model()
    opt = AdaHessian(model.parameters(), lr=0.02, update_each=1, backend=backend)
    _steps(model, opt, 0, 4)
    saved = copy.deepcopy(opt.state_dict())

    resumed = AdaHessian(model.parameters(), lr=0.02, update_each=3, backend=backend)
    resumed.load_state_dict(saved)
    assert resumed.update_each == 1  # the saved settings win over the constructor's
    resumed.update_each = 3  # the documented way to change a setting after loading
    record = _steps(model, resumed, 4, 9)
    assert _every_parameter_moves_on_every_step(record), record
    assert [due for due, _ in record] == [i % 3 == 0 for i in range(9)]
    assert all(group["update_each"] == 3 for group in resumed.state_dict()["param_groups"])


def test_a_state_dict_without_settings_keeps_the_constructors_and_adapts(backend):
    # State dicts saved before the settings were (the counters and seed in a top-level
    # "adahessian" key): the constructor's values stand, and D is created at the first
    # Hessian step that needs it.
    model = _model()
    opt = AdaHessian(model.parameters(), lr=0.02, update_each=1, backend=backend)
    _steps(model, opt, 0, 4)
    saved = copy.deepcopy(opt.state_dict())
    group = saved["param_groups"][0]
    saved["adahessian"] = {"step": group["optimizer_step"], "counter": group["rademacher_counter"], "seed": group["seed"]}
    saved["param_groups"] = [{k: v for k, v in g.items() if k in ("params", "lr", "betas", "eps", "weight_decay", "hessian_power")}
                             for g in saved["param_groups"]]
    resumed = AdaHessian(model.parameters(), lr=0.02, update_each=3, backend=backend)
    resumed.load_state_dict(saved)
    assert resumed.update_each == 3
    record = _steps(model, resumed, 4, 8)
    # Steps 4 and 5 are not Hessian steps (4 % 3, 5 % 3) and have no kept D; from step 6 on, all move.
    assert [due for due, _ in record] == [False, False] + [i % 3 == 0 for i in range(6)]
    assert not any(any(moved) for _, moved in record[:2])
    assert _every_parameter_moves_on_every_step(record[2:]), record


@pytest.mark.parametrize("first,then", [("reference", "fused"), ("fused", "reference")])
def test_changing_the_backend_takes_effect(first, then, monkeypatch, fused_kernels):
    model = _model()
    opt = AdaHessian(model.parameters(), lr=0.02, update_each=2, backend=first)
    _steps(model, opt, 0, 1)
    opt.backend = then
    used = []
    real = functional.adahessian
    monkeypatch.setattr(functional, "adahessian",
                        lambda *a, **k: used.append(backends.implementation(k["backend"]).NAME) or real(*a, **k))
    assert not opt.hessian_due  # the backend does not shape D: the schedule goes on
    record = _steps(model, opt, 1, 3)
    assert _every_parameter_moves_on_every_step(record) and set(used) == {then}


# True and 0 equal the defaults 1 and False: the change must still be seen.
@pytest.mark.parametrize("name,value", [("update_each", 0), ("n_samples", 0), ("backend", "cuda"), ("update_each", 1.5),
                                        ("update_each", True), ("n_samples", True), ("block_length", True),
                                        ("average_conv_kernel", 0)])
def test_an_invalid_change_raises_at_the_next_step(name, value):
    model = _model()
    opt = AdaHessian(model.parameters(), backend="reference")
    setattr(opt, name, value)
    with pytest.raises(ValueError, match=name):
        _steps(model, opt, 0, 1)
