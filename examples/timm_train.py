"""Train a small timm model with AdaHessian through timm's own building blocks: the
optimizer factory (``create_optimizer_v2(model, "adahessian")`` after ``register()``),
the NativeScaler loss scaler (with gradient clipping if asked), and timm's cosine scheduler, on
synthetic images (nothing is downloaded: the model is built without pretrained weights).

    python examples/timm_train.py [--quick] [--model test_efficientnet] [--steps 60]
"""

from __future__ import annotations

import argparse

import torch
import timm
from timm.scheduler import create_scheduler_v2
from timm.utils import NativeScaler

from adahessian.integrations import timm as adahessian_timm


def synthetic_images(n: int, classes: int, size: int, seed: int = 0):
    """Images whose class is a colour bias plus noise: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) + torch.linspace(-1, 1, classes)[y].view(-1, 1, 1, 1)
    return x, y


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="test_efficientnet")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    # Off by default: AdaHessian's step is about m / |D| and clipping shrinks m but not
    # D (Hz is not clipped), so a clip that bites shrinks the step itself, unlike Adam's.
    parser.add_argument("--clip-grad", type=float, default=None, help="NativeScaler's clip_grad (max norm)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (8 steps on one batch of 8)")
    args = parser.parse_args(argv)
    batches = 4
    if args.quick:
        args.steps, args.batch_size, batches = 8, 8, 1

    torch.manual_seed(0)
    adahessian_timm.register()  # "adahessian" in timm's registry is now this package's optimizer
    model = timm.create_model(args.model, pretrained=False, num_classes=4)
    optimizer = timm.optim.create_optimizer_v2(
        model, "adahessian", lr=args.lr, weight_decay=1e-4, eps=1e-4, avg_conv_kernel=True, update_each=2
    )
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.steps, warmup_epochs=0)
    loss_scaler = NativeScaler(device="cpu")
    adahessian_timm.attach_native_scaler(optimizer, loss_scaler)  # clip_grad unscales first
    second_order = hasattr(optimizer, "is_second_order") and optimizer.is_second_order  # timm's train.py

    x, y = synthetic_images(args.batch_size * batches, classes=4, size=32)
    losses = []
    for step in range(args.steps):
        start = (step % batches) * args.batch_size
        xb, yb = x[start : start + args.batch_size], y[start : start + args.batch_size]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss_scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=model.parameters(), create_graph=second_order)
        scheduler.step(step + 1)
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
