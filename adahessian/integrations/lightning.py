"""Lightning: :class:`AdaHessianMixin` gives a ``LightningModule`` the backward AdaHessian
needs, ``create_graph=optimizer.hessian_due``, under automatic optimization, and makes
gradient clipping work under ``16-mixed`` precision.

Manual optimization needs no mixin: pass the flag yourself, reading it from the
optimizer inside Lightning's wrapper::

    opt = self.optimizers()
    opt.zero_grad()
    self.manual_backward(loss, create_graph=opt.optimizer.hessian_due)
    opt.step()
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType

from . import unwrap
from ..optimizer import AdaHessian


class AdaHessianMixin:
    """Mix into a ``LightningModule`` whose ``configure_optimizers`` returns one
    :class:`AdaHessian`, listed first::

        class Model(AdaHessianMixin, lightning.LightningModule): ...

    ``backward`` adds ``create_graph=optimizer.hessian_due`` (the double-backward graph
    only on the steps that recompute the Hessian diagonal) unless the caller passes
    ``create_graph``; with ``Trainer(accumulate_grad_batches > 1)`` it calls
    :meth:`AdaHessian.backward` instead, which takes each micro-batch's Hessian-vector
    products and frees its graph (the same step as one backward on the summed loss, to
    float rounding, with one micro-batch's graph in memory). With a finite-difference
    ``hvp`` every backward is plain: Lightning's automatic optimization passes the
    closure that ``step`` evaluates again at the perturbed parameters (not under
    ``16-mixed``: finite differences refuse a GradScaler; ``bf16-mixed`` works).

    Under a DDP strategy (``Trainer(strategy="ddp")``: the model wrapped in
    ``DistributedDataParallel``, whose reducer has no double backward) the exact path
    keeps the reducer out: ``on_train_batch_start`` tells the wrapper not to sync, which
    it reads at the forward (``no_sync()`` around the backward alone would come too
    late), and the optimizer averages the gradients and Hessian-vector products across
    the ranks itself, its ``process_group`` set to the wrapper's group when it has none
    (README, "Distributed data parallel"). A module that overrides
    ``on_train_batch_start`` calls ``super().on_train_batch_start(batch, batch_idx)``.
    The finite-difference path leaves DDP's reducer on: it averages the plain gradients.

    ``configure_gradient_clipping`` makes ``Trainer(gradient_clip_val=...)`` work under
    ``precision="16-mixed"`` and ``"bf16-mixed"``: Lightning's mixed-precision plugin
    refuses to clip for any optimizer that unscales inside ``step()`` (AdaHessian
    does, for its Hessian-vector products), so the mixin clips itself, after attaching
    the plugin's GradScaler (16-mixed) to the optimizer and unscaling the gradients; the
    Hessian-vector products are then unscaled by the scaler's scale, and not clipped.
    Other precision plugins clip as Lightning does.

    Raises:
        TypeError: (at the first backward) ``configure_optimizers`` returned no
            :class:`AdaHessian`.
        ValueError: several AdaHessian optimizers (manual optimization): pass
            ``create_graph`` to ``manual_backward`` yourself.
    """

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if "create_graph" in kwargs or args:
            return super().backward(loss, *args, **kwargs)
        optimizer = self._adahessian()
        if optimizer.hvp != "autograd":  # finite differences: plain backwards, step(closure) does the rest
            return super().backward(loss)
        if self.automatic_optimization and self.trainer.accumulate_grad_batches > 1:
            # Each micro-batch's Hz now, its graph freed (the plugin has already scaled
            # the loss under 16-mixed, and Lightning divided it by the accumulation count).
            return optimizer.backward(loss)
        super().backward(loss, create_graph=optimizer.hessian_due)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        wrapper = self.trainer.strategy.model
        if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
            optimizer = self._adahessian()
            if optimizer.hvp == "autograd":
                wrapper.require_backward_grad_sync = False  # DDP prepares its reducer at the forward's end
                if optimizer.process_group is None:
                    optimizer.process_group = wrapper.process_group
        return super().on_train_batch_start(batch, batch_idx)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        plugin = self.trainer.precision_plugin
        if not isinstance(plugin, MixedPrecision) or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # The plugin refuses to clip for any optimizer declaring _step_supports_amp_scaling,
        # with or without a scaler (bf16-mixed has none): unscale (16-mixed) and clip here.
        if plugin.scaler is not None:
            unwrap(optimizer).attach_grad_scaler(plugin.scaler)
            plugin.scaler.unscale_(optimizer)  # the optimizer object scaler.step() receives next
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if GradClipAlgorithmType(gradient_clip_algorithm or "norm") == GradClipAlgorithmType.VALUE:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def _adahessian(self) -> AdaHessian:
        """The one AdaHessian among the trainer's optimizers."""
        found = []
        for optimizer in self.trainer.optimizers:
            try:
                found.append(unwrap(optimizer))
            except TypeError:
                pass
        if not found:
            names = ", ".join(type(o).__name__ for o in self.trainer.optimizers) or "none"
            raise TypeError(
                f"AdaHessianMixin needs configure_optimizers to return an adahessian.AdaHessian (got: {names}); "
                "drop the mixin for other optimizers"
            )
        if len(found) > 1:
            raise ValueError(
                "AdaHessianMixin: several AdaHessian optimizers; say which one's schedule this backward follows: "
                "self.manual_backward(loss, create_graph=opt.optimizer.hessian_due)"
            )
        return found[0]
