"""torch.amp.GradScaler: grads and Hz are unscaled, non-finite steps are skipped."""

import copy

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
    assert after["adahessian"] == state_before["adahessian"]
    for idx, st in state_before["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][idx][k]), torch.as_tensor(v)), k


def test_non_finite_hessian_skips_the_step(backend):
    # Finite gradient, infinite curvature: the Hz check must catch what the scaler cannot.
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = AdaHessian([w], backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt.zero_grad()
    loss = w[1] ** 2 + ((w[0] - 1.0) * 1e19) ** 2  # at w[0] = 1: grad 0, curvature 2e38 (x4: inf)
    scaler.scale(loss).backward(create_graph=True)
    assert torch.isfinite(w.grad).all()
    scaler.step(opt)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    assert opt.hessian_due and not opt.state[w]


def test_unscale_before_step_is_refused_with_guidance():
    model = _model()
    opt = AdaHessian(model.parameters(), backend="reference")
    scaler = torch.amp.GradScaler("cpu")
    x, y = _batches(1)[0]
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward(create_graph=True)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
