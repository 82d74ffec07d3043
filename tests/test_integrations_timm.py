"""timm: the optimizer factory builds this package's AdaHessian, and timm's NativeScaler
(the loss scaler timm's train.py calls with create_graph=optimizer.is_second_order)
trains exactly as a hand-written loop, with and without clip_grad."""

import importlib
import os

import pytest
import torch

from adahessian import AdaHessian

# `make test-frameworks` sets this: there a missing framework is a failure, not a skip.
if os.environ.get("ADAHESSIAN_TEST_FRAMEWORKS") == "1":
    timm = importlib.import_module("timm")
else:
    timm = pytest.importorskip("timm")

STEPS = 3


@pytest.fixture
def registered():
    from adahessian.integrations import timm as integration
    from timm.optim._optim_factory import default_registry

    saved = default_registry.get_optimizer_info("adahessian")
    integration.register()
    yield integration
    default_registry.register(saved)  # timm's own Adahessian again, for other tests


def make_model():
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=4)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(STEPS)]


def test_the_factory_builds_adahessian_with_timms_arguments_mapped(registered):
    model = make_model()
    opt = timm.optim.create_optimizer_v2(
        model, "adahessian", lr=0.02, weight_decay=0.05, eps=1e-4, betas=(0.8, 0.99),
        avg_conv_kernel=True, update_each=2, foreach=True,
    )
    assert type(opt) is AdaHessian and opt.is_second_order
    assert opt.average_conv_kernel is True and opt.update_each == 2
    # timm's weight-decay groups: no decay on biases and norm parameters.
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    assert all(g["lr"] == 0.02 and g["eps"] == 1e-4 and g["betas"] == (0.8, 0.99) for g in opt.param_groups)
    assert timm.optim.get_optimizer_info("adahessian").second_order


def test_register_replaces_timms_own_copy_once(registered):
    before = timm.optim.list_optimizers()
    registered.register()
    assert timm.optim.list_optimizers() == before
    assert timm.optim.get_optimizer_class("adahessian") is registered.create


def test_bad_arguments_are_refused_clearly(registered):
    model = make_model()
    with pytest.raises(TypeError, match="avg_conv_kernel .* or average_conv_kernel"):
        timm.optim.create_optimizer_v2(model, "adahessian", avg_conv_kernel=True, average_conv_kernel=True)
    with pytest.raises(ValueError, match="update_each"):
        timm.optim.create_optimizer_v2(model, "adahessian", update_each=0)
    with pytest.raises(TypeError, match="NativeScaler"):
        registered.attach_native_scaler(AdaHessian(model.parameters()), torch.amp.GradScaler("cpu"))


def train_with_timm(clip_grad, attach=True, **opt_args):
    """timm's building blocks, as train.py's train_one_epoch uses them."""
    from adahessian.integrations import timm as integration
    from timm.utils import NativeScaler

    model = make_model()
    opt = timm.optim.create_optimizer_v2(model, "adahessian", **opt_args)
    loss_scaler = NativeScaler(device="cpu")
    if attach:
        integration.attach_native_scaler(opt, loss_scaler)
    second_order = hasattr(opt, "is_second_order") and opt.is_second_order  # as train.py reads it
    for x, y in batches():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss_scaler(loss, opt, clip_grad=clip_grad, parameters=model.parameters(), create_graph=second_order)
    return model, loss_scaler


def train_by_hand(clip_grad, **opt_args):
    model = make_model()
    opt = AdaHessian(model.parameters(), **opt_args)
    for x, y in batches():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        opt.step()
    return model


@pytest.mark.parametrize("clip_grad", [None, 0.05])
def test_native_scaler_trains_as_a_hand_written_loop(registered, clip_grad):
    args = dict(lr=0.05, eps=1e-4, update_each=2)
    model, loss_scaler = train_with_timm(clip_grad, **args)
    assert loss_scaler.state_dict()["scale"] == 2.0**16  # the loss really was scaled (and never skipped)
    expected = train_by_hand(clip_grad, **args)
    initial = make_model()
    moved = 0
    for (name, p), q, p0 in zip(model.named_parameters(), expected.parameters(), initial.parameters()):
        # The scale is a power of two: unscaling is exact, and so is the whole run.
        assert torch.equal(p, q), name
        moved += not torch.equal(p, p0)
    assert moved == len(list(initial.parameters()))
    if clip_grad is not None:  # the clipping was active: without it the run differs
        unclipped = train_by_hand(None, **args)
        assert not torch.equal(next(unclipped.parameters()), next(expected.parameters()))


def test_clipping_without_the_attached_scaler_names_the_fix(registered):
    with pytest.raises(RuntimeError, match="attach_grad_scaler"):
        train_with_timm(0.05, attach=False, lr=0.05)


@pytest.mark.tooling  # the example script, as the repository's other example tests
def test_example_quick_runs(registered, capsys):
    from examples import timm_train

    losses = timm_train.main(["--quick"])
    assert len(losses) == 8 and losses[-1] < losses[0] / 4
