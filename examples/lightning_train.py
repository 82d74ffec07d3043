"""Train a small classifier with AdaHessian under a Lightning Trainer (CPU): the
LightningModule mixes in AdaHessianMixin, which passes create_graph=optimizer.hessian_due
to every backward, so the double-backward graph is built only on Hessian steps
(update_each=2 here). Synthetic data, made in code.

    python examples/lightning_train.py [--quick] [--epochs 10] [--precision bf16-mixed --clip 1.0]
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch

from adahessian import AdaHessian
from adahessian.integrations.lightning import AdaHessianMixin


class Classifier(AdaHessianMixin, L.LightningModule):  # the mixin first: its backward wins
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return AdaHessian(self.parameters(), lr=self.lr, eps=1e-4, update_each=2)


def blobs(n: int, seed: int = 0):
    """Four Gaussian blobs in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    centres = torch.randn(4, 8, generator=g) * 2
    return centres[y] + torch.randn(n, 8, generator=g), y


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--precision", default="32-true", help='Lightning precision, e.g. "bf16-mixed"')
    parser.add_argument("--clip", type=float, default=None, help="Trainer(gradient_clip_val=...)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (1 epoch of 8 steps)")
    args = parser.parse_args(argv)
    n = 256 if args.quick else 2048
    if args.quick:
        args.epochs = 1

    torch.manual_seed(0)
    x, y = blobs(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    model = Classifier()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, precision=args.precision,
        gradient_clip_val=args.clip, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, loader)
    for step in range(0, len(model.losses), max(1, len(model.losses) // 8)):
        print(f"step {step:4d}  loss {model.losses[step]:.4f}")
    print(f"final loss {model.losses[-1]:.4f}")
    return model.losses


if __name__ == "__main__":
    main()
