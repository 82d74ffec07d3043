"""Bad input gets an error that says what to do; odd-but-legal input is handled."""

import warnings

import pytest
import torch

from adahessian import AdaHessian, backends, math_attention


def _w():
    return torch.nn.Parameter(torch.randn(3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-0.1), "learning rate"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(hessian_power=1.5), "Hessian power"),
        (dict(hessian_power=-0.1), "Hessian power"),
        (dict(update_each=0), "update_each"),
        (dict(n_samples=0), "n_samples"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaHessian([_w()], **kwargs)


def test_invalid_hyperparameters_in_a_later_param_group():
    opt = AdaHessian([_w()], backend="reference")
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [_w()], "lr": -1.0})


def test_valid_edges_are_accepted():
    AdaHessian([_w()], lr=0.0, eps=0.0, betas=(0.0, 0.0), hessian_power=0.0, seed=0, backend="reference")
    AdaHessian([_w()], hessian_power=1.0, seed=2**32 - 1, backend="reference")


def test_step_without_create_graph_says_what_to_do(backend):
    w = _w()
    opt = AdaHessian([w], backend=backend)
    (w**2).sum().backward()
    with pytest.raises(RuntimeError, match=r"create_graph=True.*hessian_due"):
        opt.step()


def test_gradient_without_graph_gets_zero_curvature_and_one_warning(backend):
    w, b = _w(), torch.nn.Parameter(torch.zeros(4, 2))
    opt = AdaHessian([w, b], lr=0.1, update_each=2, backend=backend)
    for step in range(4):
        opt.zero_grad()
        loss = (w**4).sum() + b.sum()  # b's gradient is a constant: no graph
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss.backward(create_graph=True)
            opt.step()
        ours = [c for c in caught if "AdaHessian" in str(c.message)]
        assert len(ours) == (1 if step == 0 else 0)
        if ours:
            assert "(4, 2)" in str(ours[0].message) and "D = 0" in str(ours[0].message)
            # What that step implies, and what bounds it.
            assert "lr * |m| / eps" in str(ours[0].message) and "a larger eps bounds it" in str(ours[0].message)
            assert ours[0].filename == __file__  # at the user's line
    assert torch.equal(opt.state[b]["hessian"], torch.zeros(4, 2))
    assert (opt.state[w]["hessian"] != 0).all()


class OnceDifferentiableSquaredError(torch.autograd.Function):
    """A loss with a hand-written backward that has no double backward, as fused loss
    kernels are."""

    @staticmethod
    def forward(ctx, prediction, target):
        ctx.save_for_backward(prediction, target)
        return ((prediction - target) ** 2).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        prediction, target = ctx.saved_tensors
        return grad * 2 * (prediction - target) / prediction.numel(), None


def _ours(caught):
    return [str(c.message) for c in caught if "AdaHessian" in str(c.message)]


def _step_recording_warnings(opt, loss):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss.backward(create_graph=True)
        opt.step()
    return _ours(caught)


CAUSES = ("linear", "autograd.Function", "once_differentiable", ".detach()", "no_grad")


def test_create_graph_without_double_backward_gives_zero_curvature_and_names_the_causes(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = AdaHessian(model.parameters(), lr=0.1, update_each=2, backend=backend)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    before = [p.detach().clone() for p in model.parameters()]
    ours = _step_recording_warnings(opt, OnceDifferentiableSquaredError.apply(model(x), y))
    assert len(ours) == 1 and all(cause in ours[0] for cause in CAUSES), ours
    assert "create_graph=True" in ours[0] and "(1, 4)" in ours[0] and "(1,)" in ours[0]
    assert "does not depend" not in ours[0]
    for p, b in zip(model.parameters(), before):
        assert torch.equal(opt.state[p]["hessian"], torch.zeros_like(p)) and not torch.equal(p, b)


def test_the_warning_never_blames_the_gradient_for_not_depending_on_parameters(backend):
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(4, 6), torch.nn.ModuleList([torch.nn.Linear(6, 1), torch.nn.Linear(6, 1)])
    opt = AdaHessian(list(trunk.parameters()) + list(heads.parameters()), lr=0.01, backend=backend)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    h = torch.tanh(trunk(x))
    loss = sum(OnceDifferentiableSquaredError.apply(head(h), y) for head in heads)
    ours = _step_recording_warnings(opt, loss)
    # The heads' biases have gradients without a graph (the loss's backward has no
    # double backward), though they depend on every parameter.
    assert len(ours) == 1 and "once_differentiable" in ours[0] and "does not depend" not in ours[0]


def test_a_loss_linear_in_the_parameters_has_exactly_zero_curvature(backend):
    model = torch.nn.Linear(3, 2)
    opt = AdaHessian(model.parameters(), lr=0.1, update_each=2, backend=backend)
    ours = _step_recording_warnings(opt, model(torch.randn(5, 3)).sum())
    assert len(ours) == 1 and "linear" in ours[0]
    assert all(opt.state[p]["step"] == 1 and not opt.state[p]["hessian"].any() for p in model.parameters())


def test_zero_size_parameters_need_no_curvature_and_trigger_no_warning(backend):
    w, empty = _w(), torch.nn.Parameter(torch.zeros(0, 3))
    opt = AdaHessian([w, empty], backend=backend)
    assert _step_recording_warnings(opt, (w**4).sum() + empty.sum()) == []
    assert opt.state[w]["step"] == 1


def test_a_gradient_set_by_hand_without_graph_is_the_users_to_fix(backend):
    w = _w()
    opt = AdaHessian([w], backend=backend)
    w.grad = torch.ones(3)  # no backward ran: nothing says create_graph was asked for
    with pytest.raises(RuntimeError, match=r"create_graph=True"):
        opt.step()


def test_a_plain_backward_after_a_create_graph_one_is_the_users_to_fix(backend):
    w = _w()
    opt = AdaHessian([w], backend=backend)
    (w**4).sum().backward(create_graph=True)
    opt.step()
    opt.zero_grad()
    (w**4).sum().backward()  # a Hessian step is due: the graph is missing, and the user can tell why
    with pytest.raises(RuntimeError, match=r"computed without one: call loss.backward\(create_graph=True\)"):
        opt.step()


def test_parameter_whose_first_gradient_arrives_between_hessian_steps_waits(backend):
    w, late = _w(), torch.nn.Parameter(torch.ones(2))
    opt = AdaHessian([w, late], update_each=3, backend=backend)
    for step in range(4):
        opt.zero_grad()
        loss = (w**4).sum()
        if step >= 1:
            loss = loss + (late**2).sum()
        loss.backward(create_graph=opt.hessian_due)
        opt.step()
        if step < 3:
            assert torch.equal(late.detach(), torch.ones(2)) and not opt.state[late]
    assert opt.state[late]["step"] == 1 and not torch.equal(late.detach(), torch.ones(2))


def test_sparse_gradients_are_refused(backend):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = AdaHessian(emb.parameters(), backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_parameters_are_refused():
    with pytest.raises(RuntimeError, match="complex"):
        AdaHessian([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], backend="reference")


def test_transformer_layer_names_the_fix_and_the_fix_works(backend):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    opt = AdaHessian(layer.parameters(), lr=0.01, backend=backend)
    x = torch.randn(4, 5, 16)
    layer(x).pow(2).mean().backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"no double backward.*math_attention.*SDPBackend.MATH"):
        opt.step()
    before = [p.detach().clone() for p in layer.parameters()]
    for _ in range(2):
        opt.zero_grad()
        with math_attention():
            loss = layer(x).pow(2).mean()
        loss.backward(create_graph=True)
        opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(layer.parameters(), before))


def test_multihead_attention_with_weights_works_as_it_is(backend):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    opt = AdaHessian(mha.parameters(), backend=backend)
    x = torch.randn(3, 4, 16)
    out, _ = mha(x, x, x)
    out.pow(2).mean().backward(create_graph=True)
    opt.step()
    assert opt.state[mha.in_proj_weight]["step"] == 1


def test_unavailable_fused_backend(monkeypatch):
    monkeypatch.setattr(backends, "fused_unavailable_reason", lambda device: "no compiler here")
    with pytest.raises(RuntimeError, match=r"backend='fused'.*no compiler here.*backend='reference'"):
        AdaHessian([_w()], backend="fused")
    with pytest.warns(UserWarning, match=r"no compiler here; using the reference path"):
        opt = AdaHessian([_w()], backend="auto")
    assert opt.resolved_backend == "reference" and "resolved_backend: reference" in repr(opt)


class OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_a_once_differentiable_function_inside_the_model_is_named_once(backend):
    # The gradients carry a graph, so nothing raises; the Hessian-vector product flows
    # around the function and silently drops its terms unless someone says so.
    torch.manual_seed(0)
    first, second = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
    opt = AdaHessian(list(first.parameters()) + list(second.parameters()), backend=backend)
    x = torch.randn(6, 3)
    for step in range(2):
        opt.zero_grad()
        ours = _step_recording_warnings(opt, second(OnceDifferentiableTanh.apply(first(x))).pow(2).mean())
        assert len(ours) == (1 if step == 0 else 0), ours
        if ours:
            assert "@once_differentiable" in ours[0] and "D is wrong" in ours[0]


def test_a_model_with_double_backward_everywhere_gets_no_such_warning(backend):
    first, second = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
    opt = AdaHessian(list(first.parameters()) + list(second.parameters()), backend=backend)
    assert _step_recording_warnings(opt, second(torch.tanh(first(torch.randn(6, 3)))).pow(2).mean()) == []


@pytest.mark.parametrize("name", ["update_each", "n_samples"])
def test_a_bool_is_not_a_count(name):
    with pytest.raises(ValueError, match=name):
        AdaHessian([_w()], backend="reference", **{name: True})
