"""Integrations with training frameworks (README, "With timm, Lightning and the Hugging
Face Trainer"). Each submodule imports its framework when imported itself, so
``import adahessian`` never needs one: ``adahessian.integrations.timm``,
``adahessian.integrations.lightning``, ``adahessian.integrations.transformers``."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from ..optimizer import AdaHessian

__all__ = ["unwrap"]


def unwrap(optimizer: Any) -> AdaHessian:
    """The :class:`AdaHessian` inside a framework's optimizer wrapper (Lightning's
    ``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``: both keep it in
    ``.optimizer`` and neither forwards ``hessian_due``), or ``optimizer`` itself.

    Args:
        optimizer: an :class:`AdaHessian`, or a wrapper holding one in ``.optimizer``.

    Raises:
        TypeError: no :class:`AdaHessian` is found.
    """
    found = optimizer
    # LightningOptimizer passes isinstance(wrapper, AdaHessian) without AdaHessian's state: unwrap first.
    while isinstance(getattr(found, "optimizer", None), Optimizer):
        found = found.optimizer
    if not isinstance(found, AdaHessian):
        raise TypeError(
            f"expected an adahessian.AdaHessian optimizer (or a framework's wrapper of one), got "
            f"{type(optimizer).__name__}: create the optimizer with adahessian.AdaHessian(model.parameters(), ...)"
        )
    return found
