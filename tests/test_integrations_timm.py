"""timm: the optimizer factory builds this package's AdaHessian, and timm's NativeScaler
(the loss scaler timm's train.py calls with create_graph=optimizer.is_second_order)
trains exactly as a hand-written loop, with and without clip_grad."""

import importlib
import os

import pytest
import dist_worker
import tolerances
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


def train_with_accumulation(scaler_kind, accum_steps=2, clip_grad=None):
    """timm's train.py loop under --grad-accum-steps (loss / accum_steps, need_update on
    the last micro-batch, zero_grad after the update), with today's NativeScaler or the
    AccumulatingScaler; also whether any gradient carried a graph between micro-batches."""
    from adahessian.integrations import timm as integration
    from timm.utils import NativeScaler

    model = make_model().double()  # float64: the trajectories compare within the error model
    opt = timm.optim.create_optimizer_v2(model, "adahessian", lr=0.05, eps=1e-4, update_each=2)
    loss_scaler = {"native": lambda: NativeScaler(device="cpu"),
                   "accumulating": lambda: integration.AccumulatingScaler(device="cpu"),
                   "accumulating, no AMP": lambda: integration.AccumulatingScaler(device="cpu", enabled=False)}[scaler_kind]()
    if scaler_kind == "native":
        integration.attach_native_scaler(opt, loss_scaler)
    graphs = []
    for x, y in batches():
        for m, (xm, ym) in enumerate(zip(x.chunk(accum_steps), y.chunk(accum_steps))):
            loss = torch.nn.functional.cross_entropy(model(xm.double()), ym) / accum_steps
            need_update = m == accum_steps - 1
            loss_scaler(loss, opt, clip_grad=clip_grad, parameters=model.parameters(), create_graph=opt.is_second_order,
                        need_update=need_update)
            if not need_update:
                graphs.append(any(p.grad is not None and p.grad.requires_grad for p in model.parameters()))
        opt.zero_grad()
    return model, graphs


@pytest.mark.parametrize("clip_grad", [None, 0.05])
def test_the_accumulating_scaler_keeps_one_micro_batchs_graph_and_trains_as_native(registered, clip_grad):
    native, native_graphs = train_with_accumulation("native", clip_grad=clip_grad)
    accumulating, graphs = train_with_accumulation("accumulating", clip_grad=clip_grad)
    unscaled, _ = train_with_accumulation("accumulating, no AMP", clip_grad=clip_grad)
    # train.py passes create_graph=is_second_order: NativeScaler keeps every graph until the step.
    assert native_graphs == [True] * STEPS and graphs == [False] * STEPS  # freed at once
    # Hz of the summed losses against the sum of each loss's Hz: equal to float rounding,
    # normwise over the model (biases before a BatchNorm have a zero exact gradient: their
    # values are round-off, which m / sqrt(v) amplifies; SPEC, section 5).
    flat = lambda model: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
    tolerances.assert_trajectory_close(flat(accumulating), flat(native), STEPS, "parameters")
    for (name, p), r in zip(accumulating.named_parameters(), unscaled.parameters()):
        assert torch.equal(p, r), name  # a power-of-two loss scale changes no bit
    assert not torch.equal(next(accumulating.parameters()), next(make_model().double().parameters()))


WORLD = 2


def _ddp_rank(rank, port, out):
    """One rank of timm's distributed loop: the model wrapped in DistributedDataParallel,
    the AccumulatingScaler, attach_ddp; each rank's half of every batch."""
    import torch.distributed as dist
    from adahessian.integrations import timm as integration

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        integration.register()
        model, opt, loss_scaler = ddp_parts()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        integration.attach_ddp(ddp, opt)
        for x, y in batches():
            xr, yr = x.double().chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            step_timm(ddp, opt, loss_scaler, xr, yr)
        torch.save({"params": [p.detach() for p in model.parameters()], "process_group": opt.process_group is not None}, out)
    finally:
        dist.destroy_process_group()


def ddp_parts():
    """A model without batch statistics (LayerNorm), float64, its AdaHessian, timm's scaler."""
    from adahessian.integrations import timm as integration

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet_ln", pretrained=False, num_classes=4).double()
    opt = timm.optim.create_optimizer_v2(model, "adahessian", lr=0.05, eps=1e-4, update_each=2)
    return model, opt, integration.AccumulatingScaler(device="cpu", enabled=False)


def step_timm(model, opt, loss_scaler, x, y):
    loss_scaler(torch.nn.functional.cross_entropy(model(x), y), opt, create_graph=True)
    opt.zero_grad()


def test_attach_ddp_makes_two_ranks_equal_one_process_on_the_whole_batch(registered, tmp_path):
    results = dist_worker.spawn_ranks(_ddp_rank, WORLD, tmp_path)
    model, opt, loss_scaler = ddp_parts()
    for x, y in batches():
        step_timm(model, opt, loss_scaler, x.double(), y)
    want = torch.cat([p.detach().flatten() for p in model.parameters()])
    for result in results:
        assert all(torch.equal(p, q) for p, q in zip(result["params"], results[0]["params"]))  # ranks agree
        got = torch.cat([p.flatten() for p in result["params"]])
        tolerances.assert_trajectory_close(got, want, STEPS, "parameters")  # normwise, as the accumulation test
        assert result["process_group"]


def test_attach_ddp_wants_the_wrapped_model(registered):
    model, opt, _ = ddp_parts()
    with pytest.raises(TypeError, match="DistributedDataParallel-wrapped model, got EfficientNet"):
        registered.attach_ddp(model, opt)


@pytest.mark.tooling  # the example script, as the repository's other example tests
def test_example_quick_runs(registered, capsys):
    from examples import timm_train

    losses = timm_train.main(["--quick"])
    assert len(losses) == 8 and losses[-1] < losses[0] / 4
