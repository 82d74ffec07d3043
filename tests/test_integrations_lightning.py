"""Lightning: a real Trainer on CPU with AdaHessianMixin trains exactly as a hand-written
loop (automatic and manual optimization), builds the double-backward graph only on
Hessian steps, and clips gradients under 16-mixed (where Lightning alone refuses) and
bf16-mixed precision."""

import importlib
import os
import warnings

import pytest
import dist_worker
import tolerances
import torch

from adahessian import AdaHessian
from training import clip_and_step

# `make test-frameworks` sets this: there a missing framework is a failure, not a skip.
if os.environ.get("ADAHESSIAN_TEST_FRAMEWORKS") == "1":
    L = importlib.import_module("lightning")
else:
    L = pytest.importorskip("lightning")

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from adahessian.integrations.lightning import AdaHessianMixin  # noqa: E402

STEPS = 5  # batches of 8
WORLD = 2  # DDP ranks
OPT_ARGS = dict(lr=0.05, eps=1e-4, update_each=2, weight_decay=0.01)


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * 8, 6, generator=g), torch.randint(0, 3, (STEPS * 8,), generator=g)


class Plain(L.LightningModule):
    """What a user writes; the tests mix AdaHessianMixin in front of it."""

    def __init__(self):
        super().__init__()
        self.net = make_net()
        self.graphs = []  # per backward: did the gradients carry a graph?

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def on_after_backward(self):
        self.graphs.append(self.net[0].weight.grad.requires_grad)

    def configure_optimizers(self):
        return AdaHessian(self.parameters(), **OPT_ARGS)


class Model(AdaHessianMixin, Plain):
    pass


class Manual(Plain):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss, create_graph=opt.optimizer.hessian_due)
        opt.step()


def fit(module, rank=None, **trainer_args):
    """``module`` trained by a real Trainer on data() in batches of 8; with ``rank``,
    one rank's interleaved half of each batch (2 DDP ranks)."""
    dataset = torch.utils.data.TensorDataset(*data())
    if rank is None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False)
    else:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8 // WORLD, sampler=sampler)
        trainer_args.update(devices=WORLD, strategy="ddp", use_distributed_sampler=False)
    trainer_args.setdefault("devices", 1)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **trainer_args,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    return module


def by_hand(clip=None, autocast=None, accumulate=1):
    """The README's loop; with autocast="float16" its GradScaler pattern with clipping;
    with accumulate > 1, AdaHessian.backward per micro-batch of the same batches."""
    net = make_net()
    opt = AdaHessian(net.parameters(), **OPT_ARGS)
    scaler = torch.amp.GradScaler("cpu") if autocast == "float16" else None
    if scaler is not None:
        opt.attach_grad_scaler(scaler)
    x, y = data()
    for i in range(STEPS // accumulate):
        opt.zero_grad()
        for j in range(i * accumulate, (i + 1) * accumulate):
            with torch.autocast("cpu", dtype=getattr(torch, autocast or "float32"), enabled=autocast is not None, cache_enabled=False):
                loss = torch.nn.functional.cross_entropy(net(x[j * 8 : (j + 1) * 8]), y[j * 8 : (j + 1) * 8])
            loss = loss if scaler is None else scaler.scale(loss)
            if accumulate > 1:
                opt.backward(loss / accumulate)
            else:
                loss.backward(create_graph=opt.hessian_due)
        clip_and_step(opt, net.parameters(), clip, scaler)
    return net


def assert_same(module, net):
    initial = make_net()
    for (name, p), q, p0 in zip(module.net.named_parameters(), net.parameters(), initial.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, p0), f"{name} did not move"


@pytest.mark.parametrize("module_class", [Model, Manual])
def test_trainer_equals_a_hand_written_loop_and_honours_hessian_due(module_class):
    module = fit(module_class())
    assert_same(module, by_hand())
    assert module.graphs == [True, False, True, False, True]  # update_each=2


def test_accumulation_frees_each_micro_batchs_graph():
    module = fit(Model(), accumulate_grad_batches=2, limit_train_batches=4)
    assert module.graphs == [False] * 4  # AdaHessian.backward took Hz and freed each graph
    assert_same(module, by_hand(accumulate=2))


class FiniteDifference(Model):
    def configure_optimizers(self):
        return AdaHessian(self.parameters(), hvp="finite_difference", **OPT_ARGS)


def test_finite_difference_hvp_uses_lightnings_closure():
    module = fit(FiniteDifference())
    # No double backward at all; one extra evaluation of the closure per Hessian step (0, 2, 4).
    assert module.graphs == [False] * (STEPS + 3)
    net = make_net()
    opt = AdaHessian(net.parameters(), hvp="finite_difference", **OPT_ARGS)
    x, y = data()
    for i in range(STEPS):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[i * 8 : (i + 1) * 8]), y[i * 8 : (i + 1) * 8])
            loss.backward()
            return loss

        opt.step(closure)
    assert_same(module, net)


def _ddp_rank(rank, port, out, module_name):
    """One rank of a 2-process Lightning DDP run (processes launched here, as torchrun
    would: Lightning sees LOCAL_RANK and creates none)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    module = fit(globals()[module_name](), rank=rank, precision="64-true")
    torch.save({"params": [p.detach() for p in module.net.parameters()], "graphs": module.graphs,
                "process_group": module.optimizers().optimizer.process_group is not None}, out)


@pytest.mark.parametrize("module_name", ["Model", "FiniteDifference"])
def test_ddp_strategy_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path, module_name):
    results = dist_worker.spawn_ranks(_ddp_rank, WORLD, tmp_path, module_name)
    # The ranks' interleaved batches of 4 together are the one process's batch of 8; float64,
    # so that the comparison is within the error model: the exact path's trajectory bound;
    # the finite difference divides the ranks' other rounding of the averaged gradient by
    # eps (~1e-8 here): normwise 1e-5, as tests/test_distributed.py holds DDP's.
    oracle = [p.detach() for p in fit(globals()[module_name](), precision="64-true").net.parameters()]
    for result in results:
        assert all(torch.equal(p, q) for p, q in zip(result["params"], results[0]["params"]))  # ranks agree
        for p, q in zip(result["params"], oracle):
            if module_name == "Model":
                tolerances.assert_trajectory_close(p, q, STEPS)
            else:
                assert ((p - q).norm() / q.norm()).item() < 1e-5
        assert result["process_group"] == (module_name == "Model")  # set by the mixin on the exact path only
    if module_name == "Model":
        assert results[0]["graphs"] == [True, False, True, False, True]  # no_sync: the graph survived DDP


def test_without_the_mixin_a_hessian_step_names_the_fix():
    with pytest.raises(RuntimeError, match="create_graph=True"):
        fit(Plain())


def test_16_mixed_clips_with_the_mixin_and_lightning_alone_refuses():
    # Lightning maps precision="16-mixed" on CPU to bf16; the plugin itself runs float16 autocast on CPU.
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(_backward_only(), plugins=[MixedPrecision("16-mixed", "cpu")], gradient_clip_val=0.05)
    module = fit(Model(), plugins=[MixedPrecision("16-mixed", "cpu")], gradient_clip_val=0.05)
    assert module.trainer.precision_plugin.scaler.get_scale() == 2.0**16  # scaled, no step skipped
    assert_same(module, by_hand(clip=0.05, autocast="float16"))
    assert not torch.equal(by_hand(autocast="float16")[0].weight, module.net[0].weight)  # the clip bit


def _backward_only():
    """The smallest user-written backward, without the mixin's clipping."""

    class BackwardOnly(Plain):
        def backward(self, loss, *args, **kwargs):
            super().backward(loss, *args, create_graph=self.optimizers().optimizer.hessian_due, **kwargs)

    return BackwardOnly()


def test_bf16_mixed_clips_with_the_mixin_and_lightning_alone_refuses():
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(_backward_only(), precision="bf16-mixed", gradient_clip_val=0.05)
    module = fit(Model(), precision="bf16-mixed", gradient_clip_val=0.05)
    assert_same(module, by_hand(clip=0.05, autocast="bfloat16"))


def test_a_module_without_adahessian_is_told_what_to_do():
    class WithAdam(Model):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    with pytest.raises(TypeError, match="configure_optimizers to return an adahessian.AdaHessian"):
        fit(WithAdam())


@pytest.mark.tooling  # the example script, as the repository's other example tests
def test_example_quick_runs():
    from examples import lightning_train

    losses = lightning_train.main(["--quick"])
    assert len(losses) >= 5 and losses[-1] < losses[0] / 2
