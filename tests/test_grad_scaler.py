"""torch.amp.GradScaler: grads and Hz are unscaled, non-finite steps are skipped, Hz
that overflows backs off on its own, and unscale_ + clipping works with an attached
scaler (README, "Mixed precision")."""

import copy
import warnings

import pytest
import torch

from adahessian import AdaHessian
from training import backward_and_step


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)]


def _train(model, opt, batches, scaler=None):
    for x, y in batches:
        opt.zero_grad()
        backward_and_step(torch.nn.functional.cross_entropy(model(x), y), opt, scaler)


@pytest.mark.parametrize("update_each,n_samples", [(1, 1), (2, 2)])
def test_scaled_run_equals_unscaled_run(backend, update_each, n_samples):
    plain, scaled = _model(), _model()
    kw = dict(lr=0.05, update_each=update_each, n_samples=n_samples, weight_decay=0.01, backend=backend)
    opt_plain, opt_scaled = AdaHessian(plain.parameters(), **kw), AdaHessian(scaled.parameters(), **kw)
    batches = _batches(8)
    _train(plain, opt_plain, batches)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3)
    _train(scaled, opt_scaled, batches, scaler)
    assert scaler.get_scale() > 2.0**14  # the scale grew: no step was skipped
    # Loss scales are powers of two: scaling and unscaling are exact.
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(next(plain.parameters()), next(_model().parameters()))


def test_inf_in_the_loss_skips_the_step(backend):
    model = _model()
    opt = AdaHessian(model.parameters(), lr=0.05, update_each=2, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = _batches(2)
    _train(model, opt, batches[:1], scaler)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    assert opt.hessian_due is False
    x, y = batches[1]
    x = x.clone()
    x[0, 0] = float("inf")
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward(create_graph=opt.hessian_due)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = opt.state_dict()
    assert after["param_groups"] == state_before["param_groups"]  # counters included
    for idx, st in state_before["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][idx][k]), torch.as_tensor(v)), k


def test_non_finite_hessian_skips_the_step(backend):
    # Finite gradient, infinite curvature: the Hz check must catch what the scaler cannot
    # (the curvature overflows float32 even unscaled, so no back-off helps).
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = AdaHessian([w], backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt.zero_grad()
    loss = w[1] ** 2 + ((w[0] - 1.0) * 2e19) ** 2  # at w[0] = 1: grad 0, curvature 8e38: inf
    scaler.scale(loss).backward(create_graph=True)
    assert torch.isfinite(w.grad).all()
    scaler.step(opt)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    assert opt.hessian_due and not opt.state[w]


def test_unscale_without_an_attached_scaler_is_refused_with_guidance():
    model = _model()
    opt = AdaHessian(model.parameters(), backend="reference")
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batches(1)[0]
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward(create_graph=True)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match=r"unscale_.*attach_grad_scaler\(scaler\)"):
        scaler.step(opt)


@pytest.mark.parametrize("attach", [False, True])
def test_unscale_that_found_an_inf_skips_cleanly(backend, attach):
    model = _model()
    opt = AdaHessian(model.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    if attach:
        opt.attach_grad_scaler(scaler)
    x, y = _batches(1)[0]
    x = x.clone()
    x[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward(create_graph=True)
    scaler.unscale_(opt)
    scaler.step(opt)  # no error: nothing would change anyway
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and not opt.state and opt.hessian_due
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_attach_grad_scaler_wants_a_grad_scaler():
    opt = AdaHessian(_model().parameters(), backend="reference")
    with pytest.raises(TypeError, match="GradScaler"):
        opt.attach_grad_scaler(2.0**16)


def _clipped_run(backend, batches, *, scaler, max_norm=0.5, process_group=None, **options):
    """Train with gradient clipping, as timm, the HF Trainer and accelerate do under AMP:
    unscale_, clip, step. Without a scaler, the same clipping on unscaled gradients."""
    model = _model()
    opt = AdaHessian(model.parameters(), lr=0.05, process_group=process_group, backend=backend, **options)
    if scaler is not None:
        opt.attach_grad_scaler(scaler)
    for x, y in batches:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward(create_graph=opt.hessian_due)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
        else:
            scaler.scale(loss).backward(create_graph=opt.hessian_due)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(opt)
            scaler.update()
    return model


@pytest.mark.parametrize("update_each,n_samples", [(1, 1), (2, 2)])
@pytest.mark.parametrize("distributed", [False, True], ids=["single", "process_group"])
def test_unscale_and_clipping_with_an_attached_scaler_equals_the_unscaled_run(
    backend, update_each, n_samples, distributed, request
):
    group = request.getfixturevalue("one_rank_group") if distributed else None
    batches = _batches(8)
    options = dict(update_each=update_each, n_samples=n_samples, weight_decay=0.01)
    plain = _clipped_run(backend, batches, scaler=None, process_group=group, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14, growth_interval=3)
    scaled = _clipped_run(backend, batches, scaler=scaler, process_group=group, **options)
    assert scaler.get_scale() > 2.0**14  # no step was skipped
    # The clipping sees the same unscaled gradients, and Hz is divided by the exact
    # (power-of-two) scale: the runs agree to the rounding of the clipping's norm
    # (its coefficient multiplies float32 gradients that differ by a power of two only).
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    unclipped = _clipped_run(backend, batches, scaler=None, max_norm=1e9, process_group=group, **options)
    assert not all(torch.equal(p, q) for p, q in zip(plain.parameters(), unclipped.parameters()))


# The README's AMP recipe on a model whose Hessian-vector products overflow float16 at
# GradScaler's default scale while its gradients do not.
def _fp16_recipe(backend, dtype, steps=12, **scaler_options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = AdaHessian(model.parameters(), lr=0.05, eps=1e-4, backend=backend)
    scaler = torch.amp.GradScaler("cpu", **scaler_options)
    g = torch.Generator().manual_seed(1)
    x, y = 3 * torch.randn(64, 16, generator=g), torch.randn(64, 1, generator=g)
    losses, moved = [], []
    for _ in range(steps):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with torch.autocast("cpu", dtype):
            loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward(create_graph=opt.hessian_due)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        moved.append(all(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return losses, moved, opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_with_default_grad_scaler_settings_trains(backend, dtype):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, moved, opt = _fp16_recipe(backend, dtype)
    assert not [c for c in caught if "AdaHessian" in str(c.message)]  # nothing skipped for good
    assert sum(moved[-6:]) >= 4, moved
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    hessian_scale = opt.state_dict()["param_groups"][0]["hessian_scale"]
    if dtype == torch.float16:  # Hz overflowed at 2^16 and backed off, and it is on record
        assert hessian_scale["backoffs"] >= 1 and hessian_scale["scale"] < 1.0
    assert hessian_scale["skipped_steps"] == 0


def test_hessian_scale_grows_back_after_a_run_of_finite_steps(backend, monkeypatch):
    from adahessian import amp

    monkeypatch.setattr(amp.HessianScale, "GROWTH_INTERVAL", 3)
    _, _, opt = _fp16_recipe(backend, torch.float16, steps=12)
    hessian_scale = opt.state_dict()["param_groups"][0]["hessian_scale"]
    # Every 3 finite Hessian steps c doubles, and backs off again when Hz overflows.
    assert hessian_scale["backoffs"] >= 2 and hessian_scale["growth_tracker"] < 3


def test_repeated_hessian_overflow_is_counted_and_warned(backend):
    # Finite gradient, curvature beyond float32 even unscaled: no back-off can help.
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = AdaHessian([w], backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    caught_per_step = []
    for _ in range(4):
        opt.zero_grad()
        loss = w[1] ** 2 + ((w[0] - 1.0) * 2e19) ** 2  # curvature 8e38: inf in float32
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scaler.scale(loss).backward(create_graph=True)
            scaler.step(opt)
            scaler.update()
        caught_per_step.append([str(c.message) for c in caught if "AdaHessian" in str(c.message)])
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    hessian_scale = opt.state_dict()["param_groups"][0]["hessian_scale"]
    assert hessian_scale["skipped_steps"] == 4 and hessian_scale["consecutive_skips"] == 4
    assert [len(c) for c in caught_per_step] == [0, 1, 0, 1]  # at 2 and 4 in a row
    assert "Hessian steps in a row skipped" in caught_per_step[1][0]


@pytest.mark.parametrize("distributed", [False, True], ids=["single", "process_group"])
def test_grads_are_left_unscaled_on_every_path(backend, distributed, request):
    group = request.getfixturevalue("one_rank_group") if distributed else None
    x, y = _batches(1)[0]
    grads = {}
    for scaled in (False, True):
        model = _model()
        opt = AdaHessian(model.parameters(), lr=0.05, backend=backend, process_group=group)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if scaled:
            backward_and_step(loss, opt, torch.amp.GradScaler("cpu", init_scale=2.0**10))
        else:
            backward_and_step(loss, opt)
        grads[scaled] = [p.grad for p in model.parameters()]
    # A power-of-two scale divides exactly: p.grad is the unscaled gradient, bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))


def test_zero_size_parameters_under_a_grad_scaler(backend):
    w, empty = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.zeros(0, 4))
    opt = AdaHessian([w, empty], backend=backend)
    before = w.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        backward_and_step((w**4).sum() + empty.sum(), opt, torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert not torch.equal(w.detach(), before) and opt.state[empty]["step"] == 2


def test_a_step_the_scaler_skips_needs_no_graph(backend):
    # torch's protocol for optimizers that handle scaling: GradScaler hands grad_scale and
    # found_inf to step(); a step it skips changes nothing, with or without the graph.
    model = _model()
    opt = AdaHessian(model.parameters(), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = _batches(1)[0]
    x = x.clone()
    x[0, 0] = float("inf")
    before = copy.deepcopy(model.state_dict())
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()  # no create_graph
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and not opt.state and opt.hessian_due
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The other order: finite gradients without the graph still get the clear error.
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(_batches(1)[0][0]), y)).backward()
    with pytest.raises(RuntimeError, match=r"without one: call loss.backward\(create_graph=True\)"):
        scaler.step(opt)
    assert not opt.state


def test_a_nan_product_is_told_from_an_overflow_and_not_retried(backend):
    # d/dw |w|^1.5 = 0 at w = 0, but its double backward is 0 * inf = NaN there: no scale
    # helps, so the step is skipped at once (no back-off) and the warning says NaN.
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    opt = AdaHessian([w], backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    messages = []
    for _ in range(3):
        opt.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backward_and_step((w.abs() ** 1.5).sum(), opt, scaler)
        messages.append([str(c.message) for c in caught if "AdaHessian" in str(c.message)])
    assert torch.equal(w.detach(), torch.tensor([0.0, 1.0]))
    hessian_scale = opt.state_dict()["param_groups"][0]["hessian_scale"]
    assert hessian_scale["scale"] == 1.0 and hessian_scale["backoffs"] == 0 and hessian_scale["skipped_steps"] == 3
    assert [len(m) for m in messages] == [1, 1, 0]  # at 1 and 2 in a row, then 4, 8, ...
    assert "NaN, with none of them infinite" in messages[0][0] and "bfloat16 autocast" in messages[0][0]
    assert scaler.get_scale() == 2.0**8  # the gradients were finite: the scaler did not back off
