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
    assert torch.equal(opt.state[b]["hessian"], torch.zeros(4, 2))
    assert (opt.state[w]["hessian"] != 0).all()


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
    assert opt._backend_for(torch.device("cpu")) == "reference"
