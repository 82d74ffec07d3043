"""Train a tiny GPT-2 (built from a config: random weights, nothing downloaded) with the
Hugging Face Trainer and AdaHessian, on synthetic token sequences (counting modulo the
vocabulary from a random start, so the next token is learnable). AdaHessianTrainer
creates AdaHessian from the TrainingArguments and passes create_graph=hessian_due to
every backward; max_grad_norm clipping and bf16 work as with the Trainer's own optimizer.

    python examples/hf_trainer.py [--quick] [--steps 200] [--bf16] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to fetch: say so to the hub client

import torch  # noqa: E402
import transformers  # noqa: E402

from adahessian.integrations.transformers import AdaHessianTrainer  # noqa: E402

VOCAB, LENGTH = 32, 16


def counting_sequences(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": row} for row in ids]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.02)
    # 0 (off) by default: AdaHessian's step is about m / |D|, and clipping shrinks m but
    # not D, so a clip that bites shrinks the step itself (unlike Adam's).
    parser.add_argument("--max-grad-norm", type=float, default=0.0)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or GPU)")
    parser.add_argument("--output-dir", default=None, help="the Trainer's output_dir (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (12 steps)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 12

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=LENGTH,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = transformers.TrainingArguments(
            output_dir=args.output_dir or scratch, max_steps=args.steps, per_device_train_batch_size=16,
            learning_rate=args.lr, weight_decay=0.01, adam_epsilon=1e-4, max_grad_norm=args.max_grad_norm, bf16=args.bf16,
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
        )
        trainer = AdaHessianTrainer(
            model=model, args=training_args, train_dataset=counting_sequences(512),
            adahessian_kwargs={"update_each": 2},  # a Hessian step every other step
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    for step in range(0, len(losses), max(1, len(losses) // 8)):
        print(f"step {step + 1:4d}  loss {losses[step]:.4f}")
    print(f"final loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
