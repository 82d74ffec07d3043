"""hvp="finite_difference" / "central_difference" (README, "Without double backward"):
D against the exact D (same z) within the stated error, no side effect of the extra
evaluations (parameters bitwise, p.grad, random state, dropout masks, batch-norm
statistics), the closure and GradScaler rules, and what it unlocks: torch.compile and
the fused attention kernels."""

import copy
import warnings

import pytest
import torch
from torch import nn

from adahessian import AdaHessian, math_attention
from cases import MLP, Transformer

F = nn.functional


def _batch(cls, dtype, seed=1):
    x, y = cls.batch(torch.Generator().manual_seed(seed))
    return x.to(dtype), y


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss
    return closure


def _relative(ds, exact):
    num = sum((d - e).double().norm() ** 2 for d, e in zip(ds, exact)) ** 0.5
    return (num / sum(e.double().norm() ** 2 for e in exact) ** 0.5).item()


def _hessians(model, opt):
    return [opt.state[p]["hessian"] for p in model.parameters()]


# Forward difference: truncation O(eps), central O(eps^2), both plus rounding O(u / eps),
# with eps = u^(1/2) resp. u^(1/3) times the parameters' scale (README): the issue's
# targets, which the measured errors meet by 10-100x (float32: 5e-4 resp. 2e-5 on the MLP).
TARGETS = [(torch.float32, "finite_difference", 1e-2), (torch.float32, "central_difference", 1e-3),
           (torch.float64, "central_difference", 1e-6)]


@pytest.mark.parametrize("cls", [MLP, Transformer], ids=["mlp", "transformer"])
@pytest.mark.parametrize("dtype,hvp,bound", TARGETS, ids=[f"{d}-{h}".replace("torch.", "") for d, h, _ in TARGETS])
@pytest.mark.parametrize("n_samples", [1, 2])
def test_d_matches_the_exact_d_within_the_error_model(backend, cls, dtype, hvp, bound, n_samples):
    torch.manual_seed(0)
    exact_model = cls().to(dtype)
    model = copy.deepcopy(exact_model)
    options = dict(update_each=2, n_samples=n_samples, backend=backend)
    exact_opt = AdaHessian(exact_model.parameters(), **options)
    opt = AdaHessian(model.parameters(), hvp=hvp, **options)
    x, y = _batch(cls, dtype)
    with math_attention():
        _loss(exact_model, x, y).backward(create_graph=True)
    exact_opt.step()
    opt.step(_closure(opt, model, x, y))
    error = _relative(_hessians(model, opt), _hessians(exact_model, exact_opt))
    assert error <= bound
    if dtype == torch.float32 and hvp == "finite_difference":
        assert error > 1e-7  # the comparison is not between two exact products


# Under autocast the gradients are computed in its dtype (unit round-off u = 2^-8 for
# bfloat16, 2^-11 for float16), and eps follows that u. The error model: forward
# truncation eps/2 |L'''[z, z]| plus rounding 2 u |g| / eps, smallest near eps ~ sqrt(u)
# at about 2.5 sqrt(u) relative; central eps^2/6 |L''''| plus u |g| / eps, about
# 1.2 u^(2/3) at eps ~ u^(1/3). The factor 4 leaves room for the models' own scales of
# the third and fourth derivatives against H (measured: 0.9-1.8 x sqrt(u) resp. u^(2/3);
# with float32's u in eps, bfloat16 autocast gave relative errors of 8 and 0.4).
AUTOCAST_BOUNDS = {"finite_difference": lambda u: 4 * u**0.5, "central_difference": lambda u: 4 * u ** (2 / 3)}


@pytest.mark.parametrize("cls", [MLP, Transformer], ids=["mlp", "transformer"])
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("hvp", list(AUTOCAST_BOUNDS))
def test_d_under_autocast_matches_the_exact_d_within_the_error_model(backend, cls, autocast, hvp):
    torch.manual_seed(0)
    exact_model = cls()
    model = copy.deepcopy(exact_model)
    exact_opt = AdaHessian(exact_model.parameters(), update_each=2, backend=backend)
    opt = AdaHessian(model.parameters(), update_each=2, hvp=hvp, backend=backend)
    x, y = _batch(cls, torch.float32)
    with math_attention():
        _loss(exact_model, x, y).backward(create_graph=True)  # float32, no autocast
    exact_opt.step()

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast):  # float16 without a scaler: the closure's choice
            loss = _loss(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    u = torch.finfo(autocast).eps / 2
    error = _relative(_hessians(model, opt), _hessians(exact_model, exact_opt))
    assert u < error <= AUTOCAST_BOUNDS[hvp](u)


# The ops that would form the difference g(theta + eps z) - g(theta) as a tensor.
DIFFERENCE_OPS = {"aten::sub", "aten::sub_", "aten::_foreach_sub", "aten::_foreach_sub_", "aten::rsub"}


@pytest.mark.usefixtures("fused_kernels")
@pytest.mark.parametrize("hvp", ["finite_difference", "central_difference"])
def test_the_fused_kernels_form_the_difference_without_an_hz_tensor(hvp):
    # The fused step hands the kernels both gradients and 1 / eps (README, "Without
    # double backward"): no aten op subtracts them, as the reference path does with
    # plain tensor ops. The closure's own backward (linear, tanh, square, sum) subtracts nothing.
    seen = {}
    for backend in ("reference", "fused"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))
        opt = AdaHessian(model.parameters(), hvp=hvp, n_samples=2, backend=backend)
        x = torch.randn(16, 12)

        def closure():
            opt.zero_grad()
            loss = model(x).square().sum()
            loss.backward()
            return loss

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step(closure)
        assert opt.state[model[0].weight]["step"] == 1
        seen[backend] = {e.name for e in prof.events()} & DIFFERENCE_OPS
    assert "aten::sub" in seen["reference"]
    assert not seen["fused"], seen["fused"]


def test_the_extra_evaluations_leave_parameters_gradient_and_random_state_as_one_evaluation(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    opt = AdaHessian(model.parameters(), lr=0.0, hvp="central_difference", backend=backend)
    x, y = _batch(MLP, torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(5)
    loss = opt.step(_closure(opt, model, x, y))
    after_step = torch.get_rng_state()
    grads = [p.grad.clone() for p in model.parameters()]
    # lr = 0: theta is restored bitwise and not moved.
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # One plain evaluation from the same random state: the same loss, gradient and state after.
    torch.manual_seed(5)
    twin_loss = _loss(twin, x, y)
    twin_loss.backward()
    assert torch.equal(loss, twin_loss)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, twin.parameters()))
    assert torch.equal(after_step, torch.get_rng_state())


def test_the_extra_evaluations_draw_the_same_dropout_masks():
    # With the masks replayed, the finite difference differentiates one function: its D
    # is the exact D of the model with that mask (float64, central: to 1e-6).
    torch.manual_seed(0)
    exact_model = nn.Sequential(nn.Linear(12, 32), nn.Dropout(0.5), nn.Tanh(), nn.Linear(32, 4)).double()
    model = copy.deepcopy(exact_model)
    exact_opt = AdaHessian(exact_model.parameters(), update_each=2)
    opt = AdaHessian(model.parameters(), update_each=2, hvp="central_difference")
    x, y = _batch(MLP, torch.float64)
    torch.manual_seed(9)
    _loss(exact_model, x, y).backward(create_graph=True)
    exact_opt.step()
    torch.manual_seed(9)
    opt.step(_closure(opt, model, x, y))
    assert _relative(_hessians(model, opt), _hessians(exact_model, exact_opt)) < 1e-6


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_batch_norm_statistics_end_as_one_evaluation_leaves_them(backend, compiled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(64, 5))
    x = torch.randn(6, 3, 6, 6)
    y = torch.randint(0, 5, (6,))
    twin = copy.deepcopy(model)
    opt = AdaHessian(model.parameters(), hvp="finite_difference", n_samples=2, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        opt.step(_closure(opt, torch.compile(model, backend="aot_eager") if compiled else model, x, y))
    _loss(twin, x, y).backward()
    for (name, b), t in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(b, t), name
    assert model[1].num_batches_tracked.item() == 1  # three evaluations ran


def test_a_hessian_step_needs_a_closure_and_other_steps_do_not():
    model = MLP()
    opt = AdaHessian(model.parameters(), update_each=2, hvp="finite_difference")
    x, y = _batch(MLP, torch.float32)
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match=r"needs step\(closure\)"):
        opt.step()
    opt.step(_closure(opt, model, x, y))
    assert not opt.hessian_due
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()  # a step with the kept D: no closure needed
    assert opt.hessian_due


def test_grad_scaler_and_hessian_backward_are_refused_with_the_reason():
    model = MLP()
    opt = AdaHessian(model.parameters(), hvp="central_difference")
    x, y = _batch(MLP, torch.float32)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(_loss(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler.step refuses a closure"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="hvp='autograd' for a sub-batch Hessian"):
        opt.hessian_backward(_loss(model, x, y))
    with pytest.raises(ValueError, match="Invalid hvp"):
        AdaHessian(model.parameters(), hvp="finite")


def test_the_setting_is_saved_and_loaded():
    model = MLP()
    opt = AdaHessian(model.parameters(), hvp="central_difference")
    x, y = _batch(MLP, torch.float32)
    opt.step(_closure(opt, model, x, y))
    fresh = AdaHessian(model.parameters())
    fresh.load_state_dict(opt.state_dict())
    assert fresh.hvp == "central_difference"


class SDPATransformer(Transformer):
    """The test Transformer with its attention as F.scaled_dot_product_attention, whose
    default CPU kernel (flash) has no double backward."""

    def forward(self, x):
        h = self.embed(x)
        q, k, v = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        heads = lambda t: t.unflatten(-1, (2, 8)).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
        h = self.norm1(h + self.attn.out_proj(attended))
        h = self.norm2(h + self.ff(h))
        return self.head(h.mean(dim=1))


def test_fused_attention_trains_without_math_attention(backend):
    torch.manual_seed(0)
    model = SDPATransformer()
    x, y = _batch(Transformer, torch.float32)
    exact_model = copy.deepcopy(model)
    exact = AdaHessian(exact_model.parameters())
    with pytest.raises(RuntimeError, match="no double backward"):  # the premise
        _loss(exact_model, x, y).backward(create_graph=True)
        exact.step()
    opt = AdaHessian(model.parameters(), lr=0.01, hvp="finite_difference", backend=backend)
    losses = [opt.step(_closure(opt, model, x, y)).item() for _ in range(8)]
    assert losses[-1] < losses[0]


def test_a_compiled_model_trains(backend):
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = _batch(MLP, torch.float32)
    with pytest.raises(RuntimeError, match="double backward"):  # the premise
        _loss(compiled, x, y).backward(create_graph=True)
        torch.autograd.grad([p.grad for p in model.parameters()], list(model.parameters()),
                            [torch.ones_like(p) for p in model.parameters()])
    model.zero_grad()
    opt = AdaHessian(model.parameters(), lr=0.05, hvp="finite_difference", backend=backend)
    losses = [opt.step(_closure(opt, compiled, x, y)).item() for _ in range(8)]
    assert losses[-1] < losses[0]
