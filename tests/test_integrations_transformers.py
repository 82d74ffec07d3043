"""Hugging Face: AdaHessianTrainer (a real transformers.Trainer with accelerate) on CPU
with tiny BERT and GPT-2 models built from configs trains exactly as a hand-written loop,
builds the double-backward graph only on Hessian steps, clips with max_grad_norm, and runs
under bf16 and fp16 (GradScaler attached)."""

import contextlib
import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads: models from configs, data made here

import pytest  # noqa: E402
import torch  # noqa: E402

from adahessian import AdaHessian, math_attention  # noqa: E402
import dist_worker  # noqa: E402
import tolerances  # noqa: E402
from training import clip_and_step  # noqa: E402

# `make test-frameworks` sets this: there a missing framework is a failure, not a skip.
if os.environ.get("ADAHESSIAN_TEST_FRAMEWORKS") == "1":
    transformers = importlib.import_module("transformers")
else:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

from adahessian.integrations import unwrap  # noqa: E402
from adahessian.integrations.transformers import AdaHessianTrainer  # noqa: E402

STEPS, BATCH, LENGTH, VOCAB = 4, 4, 8, 40


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=LENGTH, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=LENGTH,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def dataset(kind, n=STEPS * BATCH):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g) if kind == "bert" else ids
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]} for i in range(n)]


class GraphRecorder(transformers.TrainerCallback):
    """Before each optimizer step: did the gradients carry a double-backward graph?"""

    def __init__(self):
        self.graphs = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.graphs.append(next(p for p in model.parameters() if p.grad is not None).grad.requires_grad)


def arguments(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=0.01,
        weight_decay=0.01, adam_epsilon=1e-4, max_grad_norm=0.0, lr_scheduler_type="constant",
        train_sampling_strategy="sequential", use_cpu=True, report_to=[], logging_strategy="no",
        save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def train(tmp_path, kind="bert", adahessian_kwargs=None, double=False, **overrides):
    model = bert() if kind == "bert" else gpt2()
    model = model.double() if double else model
    recorder = GraphRecorder()
    trainer = AdaHessianTrainer(
        model=model, args=arguments(tmp_path, **overrides), train_dataset=dataset(kind), callbacks=[recorder],
        adahessian_kwargs=adahessian_kwargs if adahessian_kwargs is not None else {"update_each": 2},
    )
    # The Trainer otherwise normalises a loss by its own count of the batch's labels where
    # the model takes num_items_in_batch (GPT-2: 32 tokens where the loss predicts 28; BERT
    # under accumulation: not at all): pin it to the model's mean / accumulation steps,
    # which the hand-written loop computes. AdaHessian is not invariant to the loss's
    # scale (eps, weight decay), so a different normalisation is a different run.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return trainer, recorder.graphs


def by_hand(trainer, kind="bert", accumulate=1, clip=0.0, autocast=None, update_each=2):
    """The loop the Trainer should equal, with the Trainer's parameter groups (their order
    fixes each parameter's Rademacher stream). ``autocast="fp16"``: GradScaler and float16
    autocast, the README's clipping pattern."""
    model = bert() if kind == "bert" else gpt2()
    # The Trainer runs the model as TrainingArguments.use_cache says (False: no KV cache,
    # whose concatenation lays the attention's operands out otherwise and rounds otherwise).
    model.config.use_cache = getattr(trainer.args, "use_cache", model.config.use_cache)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [
        {"params": [params[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in unwrap_params(trainer)
    ]
    opt = AdaHessian(groups, lr=0.01, eps=1e-4, update_each=update_each)
    scaler = torch.amp.GradScaler("cpu") if autocast == "fp16" else None
    opt.attach_grad_scaler(scaler)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    data = dataset(kind)
    micro = BATCH // accumulate
    for step in range(STEPS):
        opt.zero_grad()
        for m in range(accumulate):
            start = (step * accumulate + m) * micro
            batch = {k: torch.stack([d[k] for d in data[start : start + micro]]) for k in data[0]}
            # As the Trainer: the math attention kernel on Hessian steps only.
            kernel = math_attention() if opt.hessian_due else contextlib.nullcontext()
            with kernel, torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss
            loss = loss / accumulate
            loss = loss if scaler is None else scaler.scale(loss)
            if accumulate > 1:  # as the Trainer: one graph at a time
                opt.backward(loss)
            else:
                loss.backward(create_graph=opt.hessian_due)
        clip_and_step(opt, model.parameters(), clip, scaler)
    return model


def unwrap_params(trainer):
    return unwrap(trainer.optimizer).param_groups


def assert_same(trainer, model):
    initial = dict((bert() if isinstance(model, transformers.BertPreTrainedModel) else gpt2()).named_parameters())
    moved = 0
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
        moved += not torch.equal(p, initial[name])
    assert moved >= len(initial) - 1  # everything but at most an unused embedding row block


def test_trainer_creates_adahessian_from_training_arguments(tmp_path):
    trainer, graphs = train(tmp_path, adam_beta1=0.8, adam_beta2=0.99)
    optimizer = unwrap_params(trainer)
    assert type(trainer.optimizer.optimizer) is AdaHessian and trainer.optimizer.optimizer.update_each == 2
    assert sorted(g["weight_decay"] for g in optimizer) == [0.0, 0.01]  # no decay on biases and LayerNorm
    assert all(g["lr"] == 0.01 and g["betas"] == (0.8, 0.99) and g["eps"] == 1e-4 for g in optimizer)
    assert graphs == [True, False, True, False]  # update_each=2: no graph on the other steps


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_trainer_equals_a_hand_written_loop(tmp_path, kind):
    trainer, _ = train(tmp_path, kind)
    assert_same(trainer, by_hand(trainer, kind))


def test_max_grad_norm_clips(tmp_path):
    trainer, _ = train(tmp_path, max_grad_norm=0.05)
    clipped = by_hand(trainer, clip=0.05)
    assert_same(trainer, clipped)
    assert not torch.equal(next(by_hand(trainer).parameters()), next(clipped.parameters()))  # the clip bit


def test_gradient_accumulation_frees_each_micro_batchs_graph(tmp_path):
    trainer, graphs = train(tmp_path, per_device_train_batch_size=BATCH // 2, gradient_accumulation_steps=2)
    assert graphs == [False] * STEPS  # AdaHessian.backward took Hz and freed each graph
    assert "hessian" in unwrap(trainer.optimizer).state[trainer.model.classifier.weight]  # D was estimated
    model = by_hand(trainer, accumulate=2)
    assert_same(trainer, model)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="bf16 autocast on CPU needs oneDNN")
def test_bf16(tmp_path):
    trainer, graphs = train(tmp_path, bf16=True)
    assert graphs == [True, False, True, False]
    assert_same(trainer, by_hand(trainer, autocast="bf16"))


def test_fp16_attaches_the_scaler_and_clips(tmp_path):
    # accelerate makes no GradScaler and no float16 autocast on a CPU (its fp16 is for
    # accelerators); giving its Accelerator both runs its GPU code path here: scaled
    # backward, unscale_ for max_grad_norm, scaler.step through AcceleratedOptimizer.
    trainer = AdaHessianTrainer(
        model=bert(), args=arguments(tmp_path, fp16=True, max_grad_norm=0.05), train_dataset=dataset("bert"),
        adahessian_kwargs={"update_each": 2},
    )
    assert trainer.accelerator.mixed_precision == "fp16"
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.native_amp = True
    trainer.train()
    assert unwrap(trainer.optimizer)._grad_scaler is trainer.accelerator.scaler
    assert trainer.accelerator.scaler.get_scale() == 2.0**16  # scaled, no step skipped
    assert_same(trainer, by_hand(trainer, clip=0.05, autocast="fp16"))


def test_an_optimizer_of_the_callers_is_used_and_checked(tmp_path):
    model = bert()
    opt = AdaHessian(model.parameters(), lr=0.02, update_each=3)
    trainer = AdaHessianTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset("bert"), optimizers=(opt, None))
    trainer.train()
    assert trainer.optimizer.optimizer is opt and opt.param_groups[0]["optimizer_step"] == STEPS
    with pytest.raises(TypeError, match="adahessian_kwargs"):
        AdaHessianTrainer(model=model, args=arguments(tmp_path), optimizers=(opt, None), adahessian_kwargs={"n_samples": 2})
    adam = torch.optim.Adam(model.parameters())
    trainer = AdaHessianTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset("bert"), optimizers=(adam, None))
    with pytest.raises(TypeError, match="adahessian.AdaHessian"):
        trainer.train()


def by_hand_finite_difference(trainer, hvp, accumulate=1, update_each=2):
    """The hand-written step(closure) loop the Trainer's finite-difference run should equal."""
    model = bert()
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = [{"params": [params[names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
              for g in unwrap_params(trainer)]
    opt = AdaHessian(groups, lr=0.01, eps=1e-4, update_each=update_each, hvp=hvp)
    data = dataset("bert")
    micro = BATCH // accumulate
    for step in range(STEPS):
        batches = [{k: torch.stack([d[k] for d in data[start : start + micro]]) for k in data[0]}
                   for start in range(step * BATCH, (step + 1) * BATCH, micro)]

        def closure():
            opt.zero_grad()
            total = 0.0
            for batch in batches:
                loss = model(**batch).loss / accumulate
                loss.backward()
                total += loss.detach()
            return total

        opt.step(closure)
    return model


@pytest.mark.parametrize("hvp", ["finite_difference", "central_difference"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_finite_difference_hvp_trains_as_a_hand_written_closure_loop(tmp_path, hvp, accumulate):
    trainer, graphs = train(tmp_path, adahessian_kwargs={"update_each": 2, "hvp": hvp},
                            per_device_train_batch_size=BATCH // accumulate, gradient_accumulation_steps=accumulate)
    assert graphs == [False] * STEPS  # plain backwards only
    optimizer = unwrap(trainer.optimizer)
    assert "step" not in optimizer.__dict__  # the shadowed step is gone after each Hessian step
    assert "hessian" in optimizer.state[trainer.model.classifier.weight]
    assert_same(trainer, by_hand_finite_difference(trainer, hvp, accumulate))


def test_a_finite_difference_hvp_under_fp16_is_refused_clearly(tmp_path):
    trainer = AdaHessianTrainer(
        model=bert(), args=arguments(tmp_path, fp16=True), train_dataset=dataset("bert"),
        adahessian_kwargs={"hvp": "finite_difference"},
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # as test_fp16_attaches_the_scaler_and_clips
    trainer.accelerator.native_amp = True
    with pytest.raises(RuntimeError, match=r"does not combine with a GradScaler.*bfloat16 autocast"):
        trainer.train()


WORLD = 2


def _ddp_rank(rank, port, out, tmp_path, adahessian_kwargs):
    """One rank of a 2-process Trainer run (launched here, as torchrun would: the Trainer
    wraps the model in DistributedDataParallel over gloo)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer, _ = train(tmp_path / f"rank{rank}", adahessian_kwargs=adahessian_kwargs, double=True,
                       per_device_train_batch_size=BATCH // WORLD)
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    torch.save({"params": [p.detach() for p in trainer.model.parameters()],
                "process_group": unwrap(trainer.optimizer).process_group is not None}, out)


@pytest.mark.parametrize("hvp", ["autograd", "finite_difference"])
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, hvp):
    kwargs = {"update_each": 2, "hvp": hvp}
    results = dist_worker.spawn_ranks(_ddp_rank, WORLD, tmp_path, tmp_path, kwargs)
    # accelerate hands the ranks consecutive batches of 4: together the one process's batch
    # of 8. float64, normwise over the model (the attention's key biases have a zero exact
    # gradient: their values are round-off; SPEC, section 5): the exact path within the
    # trajectory bound; the finite difference divides the ranks' other rounding of the
    # averaged gradient by eps, 1e-5.
    oracle, _ = train(tmp_path / "one", adahessian_kwargs=kwargs, double=True)
    want = torch.cat([p.detach().flatten() for p in oracle.model.parameters()])
    for result in results:
        assert all(torch.equal(p, q) for p, q in zip(result["params"], results[0]["params"]))  # ranks agree
        got = torch.cat([p.flatten() for p in result["params"]])
        if hvp == "autograd":
            tolerances.assert_trajectory_close(got, want, STEPS, "parameters")
        else:
            assert ((got - want).norm() / want.norm()).item() < 1e-5
        assert result["process_group"] == (hvp == "autograd")  # set by the subclass on the exact path only


@pytest.mark.tooling  # the example script, as the repository's other example tests
def test_example_quick_runs(tmp_path):
    from examples import hf_trainer

    losses = hf_trainer.main(["--quick", "--output-dir", str(tmp_path)])
    assert len(losses) >= 2 and losses[-1] < losses[0]
