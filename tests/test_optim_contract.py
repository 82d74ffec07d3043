"""The torch.optim contract (torch's own optimizer tests' themes, adapted to
backward(create_graph=True)): settings and counters where torch's tools look, deepcopy
and pickle, atomic add_param_group, state-dict hooks, distributed checkpoints."""

import copy
import io
import pickle

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from adahessian import AdaHessian
from training import checkpoint_batches as _batches
from training import checkpoint_groups
from training import checkpoint_run as _make
from training import train as _train


def _assert_same(model_a, model_b):
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name


def _twin(model, backend):
    """A copy of ``model`` with a new optimizer built with the constructor's defaults:
    whatever it loads must bring the settings (update_each=3, seed=99, ...) along."""
    twin = copy.deepcopy(model)
    groups = [{"params": group["params"]} for group in checkpoint_groups(twin)]  # constructor's lr, weight decay too
    return twin, AdaHessian(groups, backend=backend)


def _uninterrupted(backend, steps=9):
    model, opt = _make(backend)
    _train(model, opt, _batches(steps))
    return model


def _copy_by_pickle(pair):
    return pickle.loads(pickle.dumps(pair))


def _copy_by_torch_save(pair):
    buffer = io.BytesIO()
    torch.save(pair, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, _copy_by_pickle, _copy_by_torch_save],
                         ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_model_and_optimizer_continues_identically(backend, copier):
    model, opt = _make(backend)
    _train(model, opt, _batches(4))
    model_copy, opt_copy = copier((model, opt))
    assert opt_copy.update_each == 3 and opt_copy.n_samples == 2 and opt_copy.seed == 99
    assert opt_copy.average_conv_kernel and opt_copy.backend == backend
    assert opt_copy.hessian_due == opt.hessian_due
    _train(model_copy, opt_copy, _batches(5, first=4))
    _assert_same(_uninterrupted(backend), model_copy)
    # The copy's parameters are its own: the original's backward records stay apart.
    assert opt_copy.param_groups[0]["params"][0] is model_copy.conv.weight


def test_a_copied_optimizer_asks_for_a_process_group_object_again(one_rank_group):
    import torch.distributed as dist

    w = torch.nn.Parameter(torch.randn(3))
    opt = AdaHessian([w], backend="reference", process_group=dist.new_group([0]))
    twin = copy.deepcopy(opt)
    assert copy.deepcopy(AdaHessian([w], backend="reference", process_group="world")).process_group == "world"
    with pytest.raises(RuntimeError, match=r"set optimizer.process_group"):
        (twin.param_groups[0]["params"][0] ** 4).sum().backward(create_graph=True)
        twin.step()


def test_resume_from_state_and_param_groups_alone_is_bit_for_bit(backend):
    model, opt = _make(backend)
    _train(model, opt, _batches(4))
    saved = copy.deepcopy(opt.state_dict())
    model_b, opt_b = _twin(model, backend)
    opt_b.load_state_dict({"state": saved["state"], "param_groups": saved["param_groups"]})
    _train(model_b, opt_b, _batches(5, first=4))
    _assert_same(_uninterrupted(backend), model_b)


@pytest.mark.parametrize("when", ["trained", "fresh"])
def test_distributed_checkpoint_round_trip_is_bit_for_bit(backend, one_rank_group, when):
    steps = 4 if when == "trained" else 0
    model, opt = _make(backend)
    _train(model, opt, _batches(steps))
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))
    # A fresh optimizer's state, made by the checkpoint helper, counts no step.
    assert opt.param_groups[0]["optimizer_step"] == steps and opt.hessian_due == (steps % 3 == 0)
    model_b, opt_b = _twin(model, backend)
    set_optimizer_state_dict(model_b, opt_b, saved)
    assert opt_b.state[model_b.head.weight]["exp_avg"].dtype == torch.float32
    _train(model_b, opt_b, _batches(9 - steps, first=steps))
    _assert_same(_uninterrupted(backend), model_b)


def test_state_dict_hooks_see_and_change_what_torch_says(backend):
    model, opt = _make(backend)
    _train(model, opt, _batches(4))
    seen = {}

    def state_dict_post_hook(_, state_dict):
        seen["saved counters"] = state_dict["param_groups"][0]["optimizer_step"]
        state_dict["param_groups"][0]["note"] = "post-processed"
        return state_dict

    opt.register_state_dict_post_hook(state_dict_post_hook)
    saved = opt.state_dict()
    assert seen["saved counters"] == 4 and saved["param_groups"][0]["note"] == "post-processed"

    model_b, opt_b = _make(backend)
    head_id = len(opt_b.param_groups[0]["params"]) + 2  # head.weight's index in the state dict
    marker = torch.full_like(saved["state"][head_id]["exp_avg"], 0.125)

    def pre_hook(_, state_dict):
        seen["loaded counters"] = state_dict["param_groups"][0]["optimizer_step"]
        replaced = copy.deepcopy(state_dict)
        replaced["state"][head_id]["exp_avg"] = marker
        return replaced

    def post_hook(optimizer):
        state = optimizer.state[model_b.head.weight]
        seen["after load"] = (optimizer.hessian_due, state["exp_avg"].dtype, state["exp_avg"][0, 0].item())

    opt_b.register_load_state_dict_pre_hook(pre_hook)
    opt_b.register_load_state_dict_post_hook(post_hook)
    opt_b.load_state_dict(saved)
    assert seen["loaded counters"] == 4
    assert seen["after load"] == (opt.hessian_due, torch.float32, 0.125)
    assert torch.equal(opt_b.state[model_b.head.weight]["exp_avg"], marker)


@pytest.mark.parametrize("group,error,match", [
    (dict(lr=-1.0), ValueError, "learning rate"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(update_each=2), ValueError, "update_each must be the same in every param group"),
    (dict(params=[torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]), RuntimeError, "complex"),
])
def test_a_refused_group_leaves_no_trace(backend, group, error, match):
    w, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.ones(2))
    opt = AdaHessian([w], backend=backend)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [q], **group})
    assert len(opt.param_groups) == 1 and opt.state_dict() == before
    ((w**4).sum() + (q**4).sum()).backward(create_graph=True)
    opt.step()
    assert torch.equal(q.detach(), torch.ones(2))


def test_a_later_group_inherits_changed_settings_and_the_counters(backend):
    w, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = AdaHessian([w], backend=backend)
    (w**4).sum().backward(create_graph=True)
    opt.step()
    opt.update_each = 2
    opt.add_param_group({"params": [q]})
    assert opt.param_groups[1]["update_each"] == 2 and opt.param_groups[1]["optimizer_step"] == 1


def test_groups_that_disagree_on_a_setting_are_refused_at_step():
    w = torch.nn.Parameter(torch.randn(3))
    opt = AdaHessian([{"params": [w]}, {"params": [torch.nn.Parameter(torch.randn(2))]}], backend="reference")
    opt.param_groups[1]["n_samples"] = 2
    with pytest.raises(ValueError, match=r"disagree on n_samples.*optimizer.n_samples = value"):
        opt.step()


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-element"])
def test_a_tensor_lr_trains_as_its_float_does_and_resumes(backend, shape):
    # torch.optim takes lr as a 1-element tensor (schedulers fill_ it in place); the step
    # reads it once on the host. Same run as the float lr, bit for bit, and a state dict
    # that holds the tensor resumes exactly.
    def run(tensor):
        model, opt = _make(backend)
        for group in opt.param_groups:
            # float64: the same number as the float lr (a float32 tensor holds a rounded one).
            group["lr"] = torch.full(shape, group["lr"], dtype=torch.float64) if tensor else group["lr"]
        schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for x, y in _batches(4):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward(create_graph=opt.hessian_due)
            opt.step()
            schedule.step()
        return model, opt

    (model, opt), (reference, reference_opt) = run(tensor=True), run(tensor=False)
    assert all(torch.is_tensor(g["lr"]) and g["lr"].shape == shape for g in opt.param_groups)
    assert [float(g["lr"]) for g in opt.param_groups] == [g["lr"] for g in reference_opt.param_groups]
    _assert_same(model, reference)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    model_b, opt_b = _twin(model, backend)
    opt_b.load_state_dict(torch.load(buffer))  # weights_only: the tensor lr loads too
    assert all(torch.equal(a["lr"], b["lr"]) for a, b in zip(opt_b.param_groups, opt.param_groups))
    for m, o in ((model, opt), (model_b, opt_b)):
        _train(m, o, _batches(3, first=4))
    _assert_same(model, model_b)


@pytest.mark.parametrize("lr,message", [
    (torch.tensor([1e-3, 1e-3]), r"a tensor of shape \(2,\).*one real number \(a 1-element"),
    (torch.tensor(1), r"dtype torch.int64.*1-element floating-point"),
    (torch.tensor(-0.1), r"Invalid learning rate: -0.1\d* \(a number >= 0\)"),
    (-0.1, r"Invalid learning rate: -0.1 \(a number >= 0\)"),
], ids=["two elements", "integer", "negative tensor", "negative"])
def test_a_bad_lr_is_refused_with_the_rule(lr, message):
    with pytest.raises(ValueError, match=message):
        AdaHessian([torch.nn.Parameter(torch.randn(3))], lr=lr, backend="reference")


def test_weight_decay_must_not_be_negative():
    with pytest.raises(ValueError, match="Invalid weight_decay value: -1"):
        AdaHessian([torch.nn.Parameter(torch.randn(3))], weight_decay=-1, backend="reference")


def test_a_step_saved_as_a_tensor_is_read_as_an_int(backend):
    model, opt = _make(backend)
    _train(model, opt, _batches(4))
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state["step"] = torch.tensor(float(state["step"]))  # torch's own optimizers' format
    model_b, opt_b = _twin(model, backend)
    opt_b.load_state_dict(saved)
    assert all(type(s["step"]) is int for s in opt_b.state.values())
    _train(model_b, opt_b, _batches(5, first=4))
    _assert_same(_uninterrupted(backend), model_b)


def test_repr_shows_the_optimizer_wide_settings():
    text = repr(AdaHessian([torch.nn.Parameter(torch.randn(3))], update_each=4, n_samples=2, seed=7,
                           average_conv_kernel=True, backend="reference"))
    for line in ("update_each: 4", "n_samples: 2", "seed: 7", "average_conv_kernel: True", "backend: reference"):
        assert line in text


def test_resolved_backend_says_what_the_next_step_runs(fused_kernels):
    opt = AdaHessian([torch.nn.Parameter(torch.randn(3))])
    assert opt.backend == "auto" and opt.resolved_backend == "fused" and "resolved_backend: fused" in repr(opt)
    opt.backend = "reference"  # before any step: what the next one runs
    assert opt.resolved_backend == "reference" and "resolved_backend: reference" in repr(opt)
    opt.update_each = 0  # repr never raises; the property raises as step() would
    assert "resolved_backend: none (Invalid update_each: 0" in repr(opt)
    with pytest.raises(ValueError, match="Invalid update_each"):
        opt.resolved_backend
    with pytest.raises(AttributeError):
        opt.resolved_backend = "fused"


def test_fused_backend_on_meta_parameters_is_accepted_at_construction():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 2)
    opt = AdaHessian(model.parameters(), backend="fused")
    assert opt.backend == "fused"
