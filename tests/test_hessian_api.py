"""optimizer.backward(loss) and optimizer.hessian_backward(loss) (README, "Gradient
accumulation and a sub-batch Hessian"): micro-batches through backward equal one
full-batch backward and free each graph at once; hessian_backward gives the sub-batch's
Hessian and leaves the gradients alone; GradScaler, process_group, the settings and the
errors."""

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import adahessian
from adahessian import AdaHessian, sampler

F = nn.functional


class GroupNormCNN(nn.Module):
    """No batch statistics: the gradient and Hz of a batch are the sums of its samples'."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.conv1(x)))
        return self.head(torch.tanh(self.conv2(h)).mean(dim=(2, 3)))


def _batches(n, size=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
            for _ in range(n)]


def _pair(backend, dtype=torch.float64, **options):
    torch.manual_seed(0)
    model = GroupNormCNN().to(dtype)
    twin = copy.deepcopy(model)
    options = dict(dict(lr=0.05, update_each=2, n_samples=2, average_conv_kernel=True, weight_decay=0.01), **options)
    return (model, AdaHessian(model.parameters(), backend=backend, **options),
            twin, AdaHessian(twin.parameters(), backend=backend, **options))


def _classic_step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=opt.hessian_due)
    opt.step()


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_micro_batches_through_backward_equal_one_full_batch_backward(backend):
    # float64, so the only difference is rounding (float32 trajectories amplify round-off).
    model, opt, twin, twin_opt = _pair(backend)
    for x, y in _batches(6):
        _classic_step(model, opt, x, y)
        twin_opt.zero_grad()
        for xs, ys in zip(x.chunk(4), y.chunk(4)):
            twin_opt.backward(F.cross_entropy(twin(xs), ys) / 4)
        twin_opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert _relative(q, p) < 1e-10, name
        assert _relative(twin_opt.state[q]["hessian"], opt.state[p]["hessian"]) < 1e-10, name
    assert twin_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    assert not torch.equal(next(model.parameters()), next(GroupNormCNN().double().parameters()))


def _saved_input_refs(model):
    """Weak references to each forward's input of conv2, which its backward saves: a
    tensor that only the graph holds once the forward returns."""
    saved = []
    model.conv2.register_forward_hook(lambda module, inputs, output: saved.append(weakref.ref(inputs[0])))
    return saved


@pytest.mark.parametrize("hessian_step", [True, False])
def test_backward_frees_the_micro_batchs_graph_before_returning(hessian_step):
    torch.manual_seed(0)
    model = GroupNormCNN()
    opt = AdaHessian(model.parameters(), update_each=2)
    saved = _saved_input_refs(model)
    batches = _batches(3, dtype=torch.float32)
    # The premise: a create_graph backward keeps the graph while the loss is held.
    loss = F.cross_entropy(model(batches[0][0]), batches[0][1])
    loss.backward(create_graph=True)
    gc.collect()
    assert saved[-1]() is not None
    opt.step()
    opt.zero_grad()
    del loss
    if hessian_step:
        x, y = batches[0]
        opt.backward(F.cross_entropy(model(x), y))
        opt.step()
    assert opt.hessian_due is hessian_step
    for x, y in batches[1:]:
        loss = F.cross_entropy(model(x), y)
        opt.backward(loss)
        gc.collect()
        assert saved[-1]() is None  # freed although the caller still holds the loss
        assert all(not p.grad.requires_grad for p in model.parameters())
    opt.step()


def _separable(theta, c):
    """Per-sample losses sum_i c[j, i] * theta_i^2 (rows j), their mean over the rows:
    the Hessian is diagonal, so Hutchinson's z * Hz is exact for any z."""
    return (c * theta**2).sum(dim=1).mean()


def test_hessian_backward_gives_the_sub_batchs_hessian_and_leaves_the_gradient(backend):
    g = torch.Generator().manual_seed(0)
    c = torch.rand(32, 10, generator=g, dtype=torch.float64) + 0.1
    theta = nn.Parameter(torch.randn(10, generator=g, dtype=torch.float64))
    opt = AdaHessian([theta], lr=0.01, update_each=2, backend=backend)
    opt.zero_grad()
    _separable(theta, c).backward()
    full_gradient = theta.grad.clone()
    before = theta.detach().clone()
    opt.hessian_backward(_separable(theta, c[:8]))
    assert torch.equal(theta.grad, full_gradient)
    opt.step()
    torch.testing.assert_close(opt.state[theta]["hessian"], 2 * c[:8].mean(dim=0), rtol=1e-14, atol=0)
    assert not torch.equal(theta.detach(), before)
    # A second call adds up: the sum of two sub-batches' Hessians (the mean loss of each).
    opt.zero_grad()
    _separable(theta, c).backward()
    opt.step()  # not a Hessian step
    assert opt.hessian_due
    opt.zero_grad()
    _separable(theta, c).backward()
    opt.hessian_backward(_separable(theta, c[:8]) / 2)
    opt.hessian_backward(_separable(theta, c[8:16]) / 2)
    opt.step()
    torch.testing.assert_close(opt.state[theta]["hessian"], 2 * c[:16].mean(dim=0), rtol=1e-14, atol=0)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_hessian_backward_equals_the_products_of_the_steps_z(backend, n_samples):
    # An independent derivation: D = mean_s z_s * H z_s with z_s from the pinned sampler.
    torch.manual_seed(0)
    model = GroupNormCNN().double()
    opt = AdaHessian(model.parameters(), update_each=3, n_samples=n_samples, seed=7, backend=backend)
    (x, y), = _batches(1)
    old = copy.deepcopy(model)  # the products are taken at the point before the step
    F.cross_entropy(model(x), y).backward()
    opt.hessian_backward(F.cross_entropy(model(x[:4]), y[:4]), floor=0.0)
    opt.step()
    old_params = list(old.parameters())
    grads = torch.autograd.grad(F.cross_entropy(old(x[:4]), y[:4]), old_params, create_graph=True)
    want = [torch.zeros_like(p) for p in old_params]
    for s in range(n_samples):
        zs = [sampler.rademacher(p.shape, sampler.rademacher_key(7, i, s), dtype=p.dtype) for i, p in enumerate(old_params)]
        hzs = torch.autograd.grad(grads, old_params, zs, retain_graph=True)
        want = [w + z * hz for w, z, hz in zip(want, zs, hzs)]
    want = [w / n_samples for w in want]
    params = list(model.parameters())
    for p, w in zip(params, want):
        torch.testing.assert_close(opt.state[p]["hessian"], w, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n_samples", [1, 2])
def test_the_sub_batch_floor_raises_small_curvature_only(backend, n_samples):
    # Separable, so D is exact: coordinates 0-2 have no curvature on the sub-batch (rows
    # 0-7) but a gradient on the full batch, the rest a curvature of at least 0.2.
    g = torch.Generator().manual_seed(0)
    c = torch.rand(32, 10, generator=g, dtype=torch.float64) + 0.1
    c[:8, :3] = 0.0
    theta = nn.Parameter(torch.randn(10, generator=g, dtype=torch.float64))
    opt = AdaHessian([theta], update_each=2, n_samples=n_samples, backend=backend)
    _separable(theta, c).backward()
    opt.hessian_backward(_separable(theta, c[:8]), floor=0.2)
    opt.step()
    exact = 2 * c[:8].mean(dim=0)
    want = torch.cat([torch.full((3,), 0.2 * exact.mean().item(), dtype=torch.float64), exact[3:]])
    assert (want[3:] > want[0]).all()  # the floor leaves the rest alone
    torch.testing.assert_close(opt.state[theta]["hessian"], want, rtol=1e-14, atol=0)
    for floor in (1.5, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="Invalid floor"):
            opt.hessian_backward(_separable(theta, c), floor=floor)


def test_hessian_backward_on_other_steps_does_nothing():
    theta = nn.Parameter(torch.ones(3))
    opt = AdaHessian([theta], update_each=2)
    (theta**4).sum().backward(create_graph=True)
    opt.step()
    assert not opt.hessian_due
    opt.zero_grad()
    (theta**2).sum().backward()
    grad = theta.grad.clone()
    opt.hessian_backward((theta**4).sum())
    assert torch.equal(theta.grad, grad) and opt._accumulator.pending is None
    opt.step()


def test_zero_grad_drops_the_accumulated_products(backend):
    model, opt, twin, twin_opt = _pair(backend, n_samples=1)
    (x, y), = _batches(1)
    opt.backward(F.cross_entropy(model(x[:8]), y[:8]))
    opt.zero_grad()  # e.g. a micro-batch thrown away
    opt.backward(F.cross_entropy(model(x[8:]), y[8:]))
    opt.step()
    twin_opt.backward(F.cross_entropy(twin(x[8:]), y[8:]))
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["hessian"], twin_opt.state[q]["hessian"])
        assert torch.equal(p, q)


def test_a_scaled_loss_equals_the_unscaled_one(backend):
    # Loss scales are powers of two, so scaling and unscaling are exact.
    model, opt, twin, twin_opt = _pair(backend, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for x, y in _batches(4, dtype=torch.float32):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            opt.backward(F.cross_entropy(model(xs), ys) / 2)
        opt.step()
        twin_opt.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            twin_opt.backward(scaler.scale(F.cross_entropy(twin(xs), ys) / 2))
        scaler.step(twin_opt)
        scaler.update()
    assert scaler.get_scale() > 2.0**12  # grew: no step was skipped
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(p.grad, q.grad)  # step() leaves p.grad unscaled


def test_clipping_after_unscale_with_an_attached_scaler(backend):
    model, opt, twin, twin_opt = _pair(backend, dtype=torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    twin_opt.attach_grad_scaler(scaler)
    for x, y in _batches(3, dtype=torch.float32):
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y))
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        twin_opt.zero_grad()
        twin_opt.backward(scaler.scale(F.cross_entropy(twin(x), y)))
        scaler.unscale_(twin_opt)
        nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        scaler.step(twin_opt)
        scaler.update()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_overflowing_products_skip_the_step_and_back_off(backend):
    # Hz = 2z carries the loss scale 2**127: it overflows float32 while the gradient
    # (2e-3 * 2**127) does not, so GradScaler sees nothing and the step skips on its own.
    theta = nn.Parameter(torch.full((4,), 1e-3))
    opt = AdaHessian([theta], lr=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    opt.backward(scaler.scale((theta**2).sum()))
    assert torch.isfinite(theta.grad).all()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(theta.detach(), torch.full((4,), 1e-3)) and not opt.state
    assert opt._hessian_scale.scale == 2.0**-4 and opt._hessian_scale.skipped_steps == 1
    assert scaler.get_scale() == 2.0**127  # the gradients were fine: the scaler did not back off
    opt.zero_grad()
    opt.backward(scaler.scale((theta**2).sum()))  # at the lower factor the products are finite
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(opt.state[theta]["exp_hessian_diag_sq"], torch.full((4,), 0.001 * 4.0))
    assert opt._hessian_scale.skipped_steps == 1


def test_process_group_reduces_the_accumulated_products(backend, one_rank_group):
    model, opt, twin, twin_opt = _pair(backend)
    twin_opt.process_group = one_rank_group
    for x, y in _batches(3):
        for o, m in [(opt, model), (twin_opt, twin)]:
            o.zero_grad()
            for xs, ys in zip(x.chunk(2), y.chunk(2)):
                o.backward(F.cross_entropy(m(xs), ys) / 2)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_mixing_with_a_create_graph_backward_is_refused():
    theta = nn.Parameter(torch.ones(3))
    opt = AdaHessian([theta])
    (theta**4).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="mixes optimizer.backward"):
        opt.backward((theta**4).sum())
    opt.zero_grad()
    opt.hessian_backward((theta**4).sum())
    (theta**4).sum().backward(create_graph=True)
    with pytest.raises(RuntimeError, match="mixes optimizer.backward"):
        opt.step()


@pytest.mark.parametrize("method", ["backward", "hessian_backward"])
def test_nothing_to_differentiate_is_a_clear_error(method):
    theta = nn.Parameter(torch.ones(3))
    other = nn.Parameter(torch.ones(3))
    opt = AdaHessian([theta])
    with pytest.raises(RuntimeError, match="a loss tensor that requires grad"):
        getattr(opt, method)((theta**2).sum().detach())
    with pytest.raises(RuntimeError, match="a loss tensor that requires grad"):
        getattr(opt, method)(3.0)
    with pytest.raises(RuntimeError, match="reaches none of the optimizer's parameters"):
        getattr(opt, method)((other**2).sum())


@pytest.mark.parametrize("setting,value", [("n_samples", 2), ("seed", 5)])
@pytest.mark.parametrize("then", ["step", "backward"])
def test_a_change_of_the_steps_z_after_its_first_backward_is_refused(backend, setting, value, then):
    # The products summed so far used the old z: neither the step nor more micro-batches may mix them with new ones.
    theta = nn.Parameter(torch.ones(3))
    opt = AdaHessian([theta], backend=backend)
    opt.backward((theta**4).sum())
    setattr(opt, setting, value)
    with pytest.raises(RuntimeError, match="belong to another step"):
        opt.step() if then == "step" else opt.backward((theta**4).sum())
    opt.zero_grad()  # the way out the message names
    opt.backward((theta**4).sum())
    opt.step()


def test_a_parameter_no_hessian_loss_reached_is_warned_about():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = AdaHessian([a, b])
    ((a**2).sum() + (b**2).sum()).backward()
    with pytest.warns(UserWarning, match=r"reached the parameter\(s\) of shape \(2,\)"):
        opt.hessian_backward((a**4).sum())
        opt.step()


def test_the_state_dict_holds_what_the_classic_path_holds(backend):
    model, opt, twin, twin_opt = _pair(backend)
    for x, y in _batches(3):
        _classic_step(model, opt, x, y)
        twin_opt.zero_grad()
        twin_opt.backward(F.cross_entropy(twin(x), y))
        twin_opt.step()
    a, b = opt.state_dict(), twin_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert {k: sorted(v) for k, v in a["state"].items()} == {k: sorted(v) for k, v in b["state"].items()}


def test_the_sub_batch_forward_under_buffers_kept_leaves_running_statistics_alone(backend):
    # hessian_backward's sub-batch forward is one more training-mode forward: without
    # buffers_kept it updates BatchNorm's running statistics a second time.
    def run(keep):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        opt = AdaHessian(model.parameters(), backend=backend)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        with adahessian.buffers_kept() if keep else contextlib.nullcontext():
            opt.hessian_backward(torch.nn.functional.mse_loss(model(x[:4]), y[:4]))
        opt.step()
        return model[1], model

    kept, kept_model = run(True)
    plain, plain_model = run(False)
    assert int(kept.num_batches_tracked) == 1 and int(plain.num_batches_tracked) == 2
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    g = torch.Generator().manual_seed(1)
    fresh(torch.randn(16, 4, generator=g))  # the full batch's forward alone
    assert torch.equal(kept.running_mean, fresh[1].running_mean) and torch.equal(kept.running_var, fresh[1].running_var)
    # The step is the same either way: the forward used the sub-batch's own statistics.
    assert all(torch.equal(a, b) for a, b in zip(kept_model.parameters(), plain_model.parameters()))
