"""Hessian-vector products without double backward (README, "Without double
backward"): ``Hz ~ (g(theta + eps z) - g(theta)) / eps`` (forward difference) or
``(g(theta + eps z) - g(theta - eps z)) / (2 eps)`` (central), each gradient one
evaluation of the user's closure with a plain ``loss.backward()``.

The extra evaluations leave no trace: the random-number generators are replayed (the
same dropout masks, and the run consumes them as one evaluation would), the buffers of
every module that runs in training mode (batch-norm running statistics) are restored,
the parameters are restored bitwise from a copy (``theta + eps z - eps z`` does not
round-trip), and ``p.grad`` ends as the gradient at theta, copied back into the memory
the first evaluation wrote (DistributedDataParallel's ``gradient_as_bucket_view``
buckets are overwritten by the later evaluations).

eps is one scalar per product (a per-tensor eps would compute ``H (eps * z)`` with a
different eps per block, not ``Hz``: the off-diagonal blocks of H mix them):
``eps = u^(1/2) (1 + ||theta||) / ||z||`` for the forward difference and ``u^(1/3) (1 +
||theta||) / ||z||`` for the central one, u the unit round-off of the lowest precision
the gradients are computed in (the parameters' dtypes, and the dtype of any autocast the
closure's evaluation at theta runs its modules under: bfloat16 autocast computes the
gradients with u = 2^-8, not float32's 2^-24), norms over all of them: the classic
balance of truncation (O(eps) forward, O(eps^2) central) against rounding (O(u / eps)),
with the step per element ``eps`` relative to the parameters' scale.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from . import accumulation
from .accumulation import Accumulated, Accumulator, Draw
from .buffers import buffers_kept
from .devices import by_device
from .functional import Difference, Estimate

# Whether each finite-difference hvp setting is the central difference.
SCHEMES = {"finite_difference": False, "central_difference": True}
CLOSURE_MESSAGE = (
    "AdaHessian(hvp={hvp!r}) computes Hessian-vector products from extra evaluations of the "
    "loss, so a Hessian step needs step(closure): a closure that zeroes the gradients, "
    "computes the loss, calls loss.backward() (no create_graph) and returns the loss, e.g. "
    "def closure(): optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss"
)
SCALER_MESSAGE = (
    "AdaHessian(hvp={hvp!r}) does not combine with a GradScaler: its Hessian steps need "
    "step(closure), and GradScaler.step refuses a closure. Use bfloat16 autocast (it needs "
    "no scaler), or hvp='autograd' with the scaler."
)


class FiniteDifference:
    """The Hessian-vector-product provider of ``hvp="finite_difference"`` (``central``
    False) and ``"central_difference"`` (the interface: :mod:`adahessian.hutchinson`)."""

    def __init__(self, hvp: str) -> None:
        self.hvp = hvp
        self.central = SCHEMES[hvp]

    def check_scaler(self, scaled: bool) -> None:
        """RuntimeError under a GradScaler (``scaled``), which refuses the closure."""
        if scaled:
            raise RuntimeError(SCALER_MESSAGE.format(hvp=self.hvp))

    def evaluate(self, closure: Callable[[], Any] | None, trainable, *, hessian_step: bool, draw: Draw,
                 factor: float, implementations) -> tuple[Any, Accumulated | None]:
        """The closure's evaluations: on a Hessian step at theta and at the perturbed
        points, the products summed into a new :class:`Accumulated` (RuntimeError
        without a closure); on other steps one evaluation, if any."""
        if not hessian_step:
            if closure is None:
                return None, None
            with torch.enable_grad():
                return closure(), None
        if closure is None:
            raise RuntimeError(CLOSURE_MESSAGE.format(hvp=self.hvp))
        acc = Accumulated(draw, factor=factor)
        params, indices = trainable
        return self._differences(closure, params, indices, acc, implementations), acc

    def backward(self, accumulator: Accumulator, loss: Tensor, trainable, *, hessian_step: bool, draw: Draw,
                 factor: float, implementations, floor: float | None) -> None:
        """``backward`` is a plain one (the products come from ``step(closure)``);
        ``hessian_backward`` (``floor`` given) is refused."""
        if floor is not None:
            raise RuntimeError(
                f"AdaHessian.hessian_backward() differentiates twice, which hvp={self.hvp!r} is there to "
                "avoid: its Hessian steps take the products from step(closure). Use hvp='autograd' for a "
                "sub-batch Hessian."
            )
        torch.autograd.backward(loss, inputs=trainable[0])

    def estimate(self, params: list[Tensor], grads: list[Tensor | None], indices: list[int], *,
                 accumulated: Accumulated, draw: Draw, implementations, record, loss_scale,
                 hessian_scale) -> tuple[Estimate, None]:
        """The estimate from the differences :meth:`evaluate` summed for ``draw`` (never
        loss-scaled: :meth:`check_scaler`)."""
        return accumulation.from_accumulated(accumulated, params, grads, indices, implementations=implementations,
                                             record=record, loss_scale=loss_scale)

    def epsilon(self, params: list[Tensor], computed_in: set[torch.dtype] = frozenset()) -> float:
        """The scalar eps for ``params`` whose gradients are also computed in the dtypes
        ``computed_in`` (autocast's; module doc); one host read."""
        unit = max(torch.finfo(dtype).eps / 2 for dtype in {p.dtype for p in params} | set(computed_in))
        root = unit ** (1 / 3) if self.central else math.sqrt(unit)
        squares = [
            torch.stack(torch._foreach_norm([params[n].detach() for n in ns])).double().square().sum().cpu()
            for ns in by_device(params).values()
        ]
        norm = math.sqrt(float(sum(squares)))
        return root * (1.0 + norm) / math.sqrt(sum(p.numel() for p in params))

    def _differences(self, closure: Callable[[], Any], params: list[Tensor], indices: list[int], acc: Accumulated,
                     implementations) -> Any:
        """Evaluate ``closure`` at theta and, per sample, at the perturbed points; add the
        differences to ``acc`` (``params``: the optimizer's trainable parameters;
        ``indices``: their flat positions). Returns the closure's loss at theta;
        ``p.grad`` is the gradient there. RuntimeError when the closure leaves no
        gradient."""
        rng = _RandomState(params)
        with torch.enable_grad(), _AutocastSeen(params) as autocast, _global_hooks_allowed():
            loss = closure()
        after = _RandomState(params)
        reached = [n for n, p in enumerate(params) if p.grad is not None]
        if not reached:
            raise RuntimeError(
                "AdaHessian: the closure left no gradient on the optimizer's parameters: it must call "
                "loss.backward() on a loss computed from them."
            )
        params = [params[n] for n in reached]
        indices = [indices[n] for n in reached]
        acc.reached.update(indices)
        grads = [p.grad for p in params]  # their memory: p.grad is written back into it
        at_theta = [g.detach().clone() for g in grads]
        theta = [p.detach().clone() for p in params]
        eps = self.epsilon(params, autocast.dtypes)
        try:
            for s in range(acc.draw.n_samples):
                keys = acc.draw.keys(indices, s)
                zs = accumulation.sample(params, keys, implementations)
                ahead = _gradient_at(closure, params, theta, zs, eps, rng)
                if self.central:
                    ahead = [g.clone() for g in ahead]  # the next evaluation may write into the same memory
                    behind = _gradient_at(closure, params, theta, zs, -eps, rng)
                else:
                    behind = at_theta
                if s == acc.draw.n_samples - 1:
                    # Kept until the step; the end of this call writes g(theta) back into the
                    # first evaluation's gradient memory, where DDP's bucket views put later ones.
                    ahead, behind = _unaliased(ahead, grads), _unaliased(behind, grads)
                # Hz = (ahead - behind) / step, formed by the backend's ops (the fused kernels: as they read both).
                difference = Difference(ahead, behind, 1.0 / (2 * eps if self.central else eps))
                accumulation.add_sample_(acc, s, params, indices, keys, zs, None, difference=difference,
                                         implementations=implementations)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, theta)
            after.restore()
            for p, g, b in zip(params, grads, at_theta):
                g.copy_(b)
                p.grad = g
        return loss


def _unaliased(tensors: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """``tensors``, each cloned where it shares memory with one of ``grads``."""
    held = {g.untyped_storage().data_ptr() for g in grads}
    return [t.clone() if t.untyped_storage().data_ptr() in held else t for t in tensors]


def _gradient_at(closure, params, theta, zs, step, rng) -> list[Tensor]:
    """The gradients at ``theta + step * z`` (zeros where none), from one evaluation with
    the random state replayed and the buffers kept; the parameters are restored."""
    with torch.no_grad():
        torch._foreach_add_(params, zs, alpha=step)
    for p in params:  # whether or not the closure zeroes them
        p.grad = None
    rng.restore()
    try:
        with torch.enable_grad(), buffers_kept(), _global_hooks_allowed():
            closure()
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, theta)
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]


@contextmanager
def _global_hooks_allowed() -> Iterator[None]:
    """Within: no warning that a compiled module's wrapper also fires the global module
    hooks of buffers_kept and _AutocastSeen (each is idempotent: a second firing changes
    nothing)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `torch.compile\\(module\\)` when there are global hooks")
        yield


class _AutocastSeen:
    """Within: the dtypes autocast computes in (on the parameters' device types) when a
    module's forward starts, collected in ``dtypes``; empty where no autocast ran."""

    def __init__(self, params: list[Tensor]) -> None:
        self.device_types = {p.device.type for p in params}
        self.dtypes: set[torch.dtype] = set()

    def __enter__(self) -> _AutocastSeen:
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def _hook(self, _module: torch.nn.Module, _args: Any) -> None:
        for device_type in self.device_types:
            if torch.is_autocast_enabled(device_type):
                self.dtypes.add(torch.get_autocast_dtype(device_type))

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class _RandomState:
    """The CPU generator's state and that of every CUDA device the parameters are on."""

    def __init__(self, params: list[Tensor]) -> None:
        self.cpu = torch.get_rng_state()
        devices = {p.device for p in params if p.device.type == "cuda"}
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)
