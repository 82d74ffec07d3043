"""The exact Hessian-vector products, from double backward (``hvp="autograd"``): the
Hutchinson estimate ``D = E[z * Hz]`` of the Hessian diagonal (docs/algorithm.md,
section 1, step 1) with z from the pinned sampler and Hz from the gradients' graph, one
``torch.autograd.grad`` call per sample over all parameters; or from the products that
``AdaHessian.backward`` / ``hessian_backward`` summed (:mod:`adahessian.accumulation`).

:class:`Autograd` is the Hessian-vector-product provider the optimizer chooses for this
setting; :mod:`adahessian.finite_difference` has the other. A provider answers for the
parts of a step that depend on where Hz comes from: the closure's evaluation
(``evaluate``), ``backward``/``hessian_backward`` (``backward``), the estimate
(``estimate``) and whether a GradScaler combines (``check_scaler``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import accumulation, amp, graphs
from .accumulation import Accumulated, Accumulator, Draw
from .functional import Estimate


class Autograd:
    """Hz by double backward: from the graph ``loss.backward(create_graph=True)`` leaves
    on ``p.grad``, or summed by ``AdaHessian.backward`` / ``hessian_backward``."""

    def check_scaler(self, scaled: bool) -> None:
        """Every GradScaler use combines with double backward."""

    def evaluate(self, closure: Callable[[], Any] | None, trainable, *, hessian_step: bool, draw: Draw,
                 factor: float, implementations) -> tuple[Any, Accumulated | None]:
        """The closure's one evaluation (the loss); the products come from its graph."""
        if closure is None:
            return None, None
        with torch.enable_grad():
            return closure(), None

    def backward(self, accumulator: Accumulator, loss: Tensor, trainable, *, hessian_step: bool, draw: Draw,
                 factor: float, implementations, floor: float | None) -> None:
        """``backward`` (``floor`` None) or ``hessian_backward``: on a Hessian step the
        loss's products are summed for the step (:meth:`Accumulator.backward`); on other
        steps ``backward`` is a plain one and ``hessian_backward`` does nothing."""
        params, indices = trainable
        if not hessian_step:
            if floor is None:
                torch.autograd.backward(loss, inputs=params)
            return
        pending = accumulator.backward(loss, params, indices, draw=draw, factor=factor,
                                       implementations=implementations, gradients=floor is None)
        if floor is not None:
            pending.floor = max(pending.floor, floor)

    def estimate(
        self, params: list[Tensor], grads: list[Tensor | None], indices: list[int], *,
        accumulated: Accumulated | None, draw: Draw, implementations, record: graphs.GraphRecord,
        loss_scale: amp.LossScale, hessian_scale: amp.HessianScale,
    ) -> tuple[Estimate, amp.Overflow | None]:
        """The Hutchinson estimate for ``params`` (their gradients ``grads``, None where a
        rank has none; ``indices``: their positions in the optimizer's flat parameter
        list, the sampler's ``param_index``) with the z of ``draw``: from ``accumulated``
        when given, else from the graph the gradients carry. Under a loss scale, Hz is
        unscaled and checked (one host read per try); on overflow the gradients' graph
        is retried with a lower factor c, while accumulated products, whose graphs are
        gone, skip the step and lower c for the next one. The second result says whether
        the step overflowed (None without a scale). Raises RuntimeError when the
        gradients have no graph (``record.check``; unless GradScaler's ``found_inf``
        skips the step: then one host read) or the graph has no double backward (fused
        attention)."""
        if accumulated is not None:
            result, overflow = accumulation.from_accumulated(
                accumulated, params, grads, indices, implementations=implementations, record=record,
                loss_scale=loss_scale)
            if overflow is amp.Overflow.HESSIAN:
                hessian_scale.back_off()
        else:
            try:
                record.check(indices, params, grads, any_graph=any(g is not None and graphs.has_graph(g) for g in grads))
            except RuntimeError:
                if not amp.found_inf(loss_scale):
                    raise
                # GradScaler skips this step anyway (torch's protocol): no graph is needed, and
                # zero products keep the ranks' buckets alike.
                empty = Accumulated(draw, factor=hessian_scale.scale)
                return accumulation.finish(empty, params, indices, implementations=implementations,
                                           loss_scale=amp.LossScale(None, False, None))[0], amp.Overflow.GRADIENTS
            retries = 0
            while True:
                acc = Accumulated(draw, factor=hessian_scale.scale)
                # Under a loss scale the graph is kept for retries (step() frees it).
                accumulation.accumulate_(acc, grads, params, indices, implementations=implementations, record=record,
                                         retain_graph=loss_scale.scale is not None)
                result, overflow = accumulation.finish(acc, params, indices, implementations=implementations,
                                                       loss_scale=loss_scale)
                if overflow is not amp.Overflow.HESSIAN or retries == hessian_scale.RETRIES or not hessian_scale.back_off():
                    break
                retries += 1
        if overflow is not None and overflow is not amp.Overflow.GRADIENTS:
            hessian_scale.finished(overflow)
        return result, overflow
