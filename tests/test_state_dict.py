"""state_dict / load_state_dict resume bit for bit; torch.optim plumbing works."""

import io

import pytest
import torch

from adahessian import AdaHessian
from training import checkpoint_batches as _batches
from training import checkpoint_run as _make
from training import train as _train


def test_resume_continues_bit_for_bit(backend):
    batches = _batches(10)
    model_a, opt_a = _make(backend)
    _train(model_a, opt_a, batches)

    model_b, opt_b = _make(backend)
    _train(model_b, opt_b, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only=True by default

    model_c, opt_c = _make(backend)
    opt_c.seed = 1  # the saved seed must win
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    assert opt_c.hessian_due == opt_b.hessian_due
    _train(model_c, opt_c, batches[5:])
    for (name, p), q in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(p, q), name
    # The low-precision head's state stays float32 through the round trip.
    assert opt_c.state[model_c.head.weight]["exp_avg"].dtype == torch.float32


def test_settings_and_counters_live_in_every_param_group_as_plain_values(backend):
    model, opt = _make(backend)
    _train(model, opt, _batches(4))
    sd = opt.state_dict()
    assert "adahessian" not in sd and set(sd) == {"state", "param_groups"}
    for group in sd["param_groups"]:
        ours = {k: group[k] for k in ("optimizer_step", "hessian_origin", "rademacher_counter", "seed", "update_each",
                                      "n_samples", "average_conv_kernel", "backend")}
        assert ours == {"optimizer_step": 4, "hessian_origin": 0, "rademacher_counter": 4, "seed": 99, "update_each": 3,
                        "n_samples": 2, "average_conv_kernel": True, "backend": backend}
        assert all(type(group[k]) is int for k in ("optimizer_step", "hessian_origin", "rademacher_counter", "seed"))
        assert group["hessian_scale"] == {"scale": 1.0, "growth_tracker": 0, "backoffs": 0, "skipped_steps": 0,
                                          "consecutive_skips": 0}
        assert type(group["hessian_scale"]["scale"]) is float
    assert all(type(s["step"]) is int for s in sd["state"].values())
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_hessian_diag_sq", "hessian"}


def test_update_each_one_keeps_no_hessian_state(backend):
    w = torch.nn.Parameter(torch.randn(3))
    opt = AdaHessian([w], backend=backend)
    (w**4).sum().backward(create_graph=True)
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_hessian_diag_sq"}


def test_lr_scheduler_and_add_param_group(backend):
    w, extra = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = AdaHessian([w], lr=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        (w**4).sum().backward(create_graph=True)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    opt.add_param_group({"params": [extra], "lr": 0.3})
    opt.zero_grad()
    ((w**4).sum() + (extra**4).sum()).backward(create_graph=True)
    opt.step()
    assert opt.state[extra]["step"] == 1 and opt.state[w]["step"] == 3


def test_zero_grad_clears_gradients(backend):
    w = torch.nn.Parameter(torch.randn(3))
    opt = AdaHessian([w], backend=backend)
    (w**4).sum().backward(create_graph=True)
    opt.step()
    opt.zero_grad()
    assert w.grad is None
