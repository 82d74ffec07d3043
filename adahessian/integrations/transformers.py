"""Hugging Face: :class:`AdaHessianTrainer`, a ``transformers.Trainer`` that trains with
:class:`AdaHessian`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import transformers
from accelerate.utils import DistributedType

from . import unwrap
from ..attention import math_attention
from ..optimizer import AdaHessian


class AdaHessianTrainer(transformers.Trainer):
    """``transformers.Trainer`` with :class:`AdaHessian`: every backward gets
    ``create_graph=optimizer.hessian_due``, so the double-backward graph is built only on
    the steps that recompute the Hessian diagonal.

    Unless an optimizer is passed (``optimizers=(AdaHessian(...), scheduler)`` or
    ``optimizer_cls_and_kwargs``), the Trainer creates ``AdaHessian`` from its
    ``TrainingArguments``: ``learning_rate``, ``weight_decay`` (decoupled, as AdamW's,
    and not on biases and norm weights, as the Trainer groups them), ``adam_beta1``,
    ``adam_beta2`` and ``adam_epsilon``, plus ``adahessian_kwargs``. With ``fp16=True``
    the accelerator's GradScaler is attached to the optimizer, so ``max_grad_norm``
    clipping (which unscales the gradients first) works; the Hessian-vector products are
    unscaled by the same scale, and not clipped. ``bf16=True`` needs no scaler.

    With ``gradient_accumulation_steps > 1`` each micro-batch goes through
    :meth:`AdaHessian.backward`, which takes its Hessian-vector products and frees its
    graph at once (the same step as one backward on the summed loss, to float rounding,
    with one micro-batch's graph in memory).

    On Hessian steps the forward runs under :func:`adahessian.math_attention` (PyTorch's
    fused attention kernels, which the models use through SDPA, have no double backward);
    ``math_attention_on_hessian_steps=False`` turns that off (for models whose attention
    is eager anyway).

    With ``hvp="finite_difference"`` or ``"central_difference"`` every backward is plain
    and the fused attention kernels stay on: on a Hessian step the optimizer's step gets
    a closure that evaluates the step's micro-batches again (the Trainer's own training
    step on the same inputs: its loss, its normalisation under gradient accumulation, its
    autocast), at theta and at the perturbed parameters; so such a step costs one
    evaluation more than the hand-written ``step(closure)`` loop, whose first
    evaluation is the step's own. Other steps cost what Adam's do. ``fp16=True`` is
    refused there (GradScaler refuses a closure; use ``bf16=True``); DDP needs no
    ``no_sync`` on this path.

    In a multi-process run (``torchrun``, ``accelerate launch``: the model wrapped in
    ``DistributedDataParallel``, whose reducer has no double backward) the exact path's
    training steps run under the wrapper's ``no_sync()`` and the optimizer averages the
    gradients and Hessian-vector products across the ranks itself: its
    ``process_group`` is set to the wrapper's group when it has none.

    Args:
        *args: ``transformers.Trainer``'s.
        adahessian_kwargs (dict, optional): further :class:`AdaHessian` arguments for the
            optimizer the Trainer creates (``update_each``, ``n_samples``, ``seed``, ...).
        math_attention_on_hessian_steps (bool, optional): see above (default: True).
        **kwargs: ``transformers.Trainer``'s.

    Raises:
        TypeError: ``adahessian_kwargs`` given together with an optimizer of the caller's;
            (at the first training step) the optimizer is not an :class:`AdaHessian`.
        ValueError: an :class:`AdaHessian` argument outside its range.
        RuntimeError: (at a Hessian step) a finite-difference ``hvp`` under ``fp16=True``.
    """

    def __init__(
        self,
        *args: Any,
        adahessian_kwargs: dict[str, Any] | None = None,
        math_attention_on_hessian_steps: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if adahessian_kwargs and (self.optimizer is not None or self.optimizer_cls_and_kwargs is not None):
            raise TypeError(
                "adahessian_kwargs configures the optimizer AdaHessianTrainer creates; an optimizer was passed "
                "too: give its arguments to AdaHessian(...) directly"
            )
        self.adahessian_kwargs = dict(adahessian_kwargs or {})
        self.math_attention_on_hessian_steps = math_attention_on_hessian_steps

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's (its weight-decay parameter groups), with :class:`AdaHessian`
        built from ``TrainingArguments`` unless the caller passed an optimizer."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            args = self.args
            kwargs = dict(
                lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            )
            self.optimizer_cls_and_kwargs = (AdaHessian, {**kwargs, **self.adahessian_kwargs})
        return super().create_optimizer(model)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's training step, its ``accelerator.backward(loss)`` given
        ``create_graph=optimizer.hessian_due``."""
        # accelerate's AcceleratedOptimizer does not forward attributes: read the wrapped one.
        optimizer = unwrap(self.optimizer)
        if optimizer.hvp != "autograd":
            if optimizer.hessian_due:
                self._replay_at_step(optimizer).append((model, inputs, num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            optimizer.attach_grad_scaler(scaler)
        create_graph = optimizer.hessian_due
        self.accelerator.backward = self._backward_for(optimizer, create_graph)
        try:
            with contextlib.ExitStack() as contexts:
                if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                    # DDP's reducer has no double backward; it decides at the forward, so no_sync
                    # covers the whole step, and the optimizer averages across the ranks itself.
                    if optimizer.process_group is None:
                        optimizer.process_group = model.process_group
                    contexts.enter_context(model.no_sync())
                if create_graph and self.math_attention_on_hessian_steps:
                    contexts.enter_context(math_attention())
                return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del self.accelerator.backward

    def _replay_at_step(self, optimizer: AdaHessian) -> list[tuple[torch.nn.Module, dict[str, Any], Any]]:
        """The micro-batches of this Hessian step, which the optimizer's next ``step``
        evaluates again through a closure (a finite-difference ``hvp``): the step is
        shadowed on the instance until it has run once, then restored (torch's LR
        schedulers keep their own wrapper of it there)."""
        if "_replayed" in optimizer.__dict__:
            return optimizer._replayed
        replayed: list[tuple[torch.nn.Module, dict[str, Any], Any]] = []
        shadowed, step = optimizer.__dict__.get("step"), optimizer.step

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            return sum(super(AdaHessianTrainer, self).training_step(model, inputs, n) for model, inputs, n in replayed)

        def step_with_closure(closure_given: Callable[[], Any] | None = None) -> Any:
            try:
                return step(closure_given or closure)
            finally:
                del optimizer.step, optimizer._replayed
                if shadowed is not None:
                    optimizer.step = shadowed

        optimizer.step, optimizer._replayed = step_with_closure, replayed
        return replayed

    def _backward_for(self, optimizer: AdaHessian, create_graph: bool) -> Callable[..., None]:
        """What the Trainer's ``accelerator.backward(loss)`` does for this step; it
        shadows the bound method for one training step rather than copy the Trainer's
        step (its loss normalisation, DeepSpeed and LOMO arguments stay the Trainer's).
        Accumulating micro-batches, ``optimizer.backward`` takes each one's
        Hessian-vector products and frees its graph, so the graphs do not pile up until
        ``step()``; it replaces the plain-DDP branch of accelerate's backward (divide by
        accelerate's own accumulation count, scale by its GradScaler)."""
        accelerator = self.accelerator
        backward = accelerator.backward
        plain = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        if self.args.gradient_accumulation_steps == 1 or not plain:
            return lambda loss, **kwargs: backward(loss, create_graph=create_graph, **kwargs)

        def accumulate(loss: torch.Tensor, **kwargs: Any) -> None:
            if kwargs:  # LOMO's learning_rate: accelerate's own branch
                return backward(loss, create_graph=create_graph, **kwargs)
            loss = loss / accelerator.gradient_accumulation_steps
            optimizer.backward(loss if accelerator.scaler is None else accelerator.scaler.scale(loss))

        return accumulate
