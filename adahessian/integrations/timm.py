"""timm: ``register()`` makes ``timm.optim.create_optimizer_v2(model, "adahessian", ...)``
(and timm's ``train.py --opt adahessian``) build this package's :class:`AdaHessian`
instead of timm's own pure-Python copy.

timm's training loop reads ``optimizer.is_second_order`` (True on :class:`AdaHessian`)
and then passes ``create_graph=True`` to every backward, its loss scalers' included. With
``NativeScaler(..., clip_grad=...)`` the scaler calls ``unscale_`` before clipping, so
the optimizer must know the scaler: :func:`attach_native_scaler`. Under
``--grad-accum-steps`` every micro-batch's double-backward graph then stays alive until
the step; :class:`AccumulatingScaler`, in place of ``NativeScaler``, sends each
micro-batch through :meth:`AdaHessian.backward` instead (one graph at a time). In a
distributed ``train.py`` run, :func:`attach_ddp` keeps DDP's reducer (no double
backward) out of the exact path.
"""

from __future__ import annotations

from typing import Any

import torch

from timm.optim import OptimInfo
from timm.optim._optim_factory import default_registry  # timm exports no accessor for it
from timm.utils.clip_grad import dispatch_clip_grad

from . import unwrap
from ..optimizer import AdaHessian

NAME = "adahessian"


def create(params: Any, avg_conv_kernel: bool | None = None, foreach: bool | None = None, **kwargs: Any) -> AdaHessian:
    """Build :class:`AdaHessian` from the arguments timm's factory passes.

    Args:
        params (iterable): parameters or parameter groups (timm's weight-decay groups).
        avg_conv_kernel (bool, optional): timm's spelling of ``average_conv_kernel``.
        foreach (bool, optional): accepted and ignored: timm passes it to any optimizer
            when asked to, and AdaHessian chooses its kernels through ``backend``.
        **kwargs: :class:`AdaHessian`'s own arguments (``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``update_each``, ``n_samples``, ``backend``, ...).

    Raises:
        TypeError: both ``avg_conv_kernel`` and ``average_conv_kernel`` given, or an
            argument :class:`AdaHessian` does not take.
        ValueError: an argument outside its range (:class:`AdaHessian`'s checks).
    """
    if avg_conv_kernel is not None:
        if "average_conv_kernel" in kwargs:
            raise TypeError("give avg_conv_kernel (timm's name) or average_conv_kernel, not both")
        kwargs["average_conv_kernel"] = avg_conv_kernel
    return AdaHessian(params, **kwargs)


def register(registry: Any = None) -> None:
    """Register :class:`AdaHessian` under the name ``"adahessian"`` in timm's optimizer
    registry, replacing timm's own ``Adahessian`` there (timm logs that it overwrites
    it). Idempotent.

    Args:
        registry (timm.optim.OptimizerRegistry, optional): the registry to change
            (default: the one ``timm.optim.create_optimizer_v2`` uses).
    """
    registry = default_registry if registry is None else registry
    try:
        if registry.get_optimizer_info(NAME).opt_class is create:
            return
    except ValueError:  # not registered yet
        pass
    registry.register(
        OptimInfo(
            name=NAME,
            opt_class=create,
            description="AdaHessian (Yao et al.), fused kernels (the adahessian package)",
            has_eps=True,
            has_betas=True,
            second_order=True,
        )
    )


def attach_native_scaler(optimizer: AdaHessian, loss_scaler: Any) -> None:
    """Hand ``optimizer`` the ``torch.amp.GradScaler`` inside timm's ``NativeScaler``,
    needed when the scaler clips (``clip_grad``): it unscales the gradients before
    clipping, and AdaHessian must then divide the Hessian-vector products by the same
    scale (:meth:`AdaHessian.attach_grad_scaler`).

    Args:
        optimizer (AdaHessian): the optimizer ``loss_scaler`` steps.
        loss_scaler (timm.utils.NativeScaler): the scaler timm's loop calls.

    Raises:
        TypeError: ``optimizer`` is not an :class:`AdaHessian`, or ``loss_scaler`` holds
            no ``torch.amp.GradScaler`` (timm's ``ApexScaler``: use ``NativeScaler``).
    """
    if not isinstance(optimizer, AdaHessian):
        raise TypeError(f"attach_native_scaler expects an AdaHessian optimizer, got {type(optimizer).__name__}")
    scaler = getattr(loss_scaler, "_scaler", None)  # NativeScaler keeps its GradScaler here
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"attach_native_scaler expects timm's NativeScaler (holding a torch.amp.GradScaler), got "
            f"{type(loss_scaler).__name__}; for a bare GradScaler call optimizer.attach_grad_scaler(scaler)"
        )
    optimizer.attach_grad_scaler(scaler)


class AccumulatingScaler:
    """The drop-in for timm's ``NativeScaler`` (the ``loss_scaler`` its ``train.py``
    calls, same call signature and state dict) that backpropagates each loss through
    :meth:`AdaHessian.backward`: on a Hessian step the micro-batch's Hessian-vector
    products are taken at once and its graph freed, so ``--grad-accum-steps k`` holds
    one micro-batch's double-backward graph instead of k (the same step, to float
    rounding). In timm's ``train.py``: ``loss_scaler = AccumulatingScaler(device)`` where
    it builds ``NativeScaler`` (``enabled=False`` without AMP, where train.py builds
    none: then it only backpropagates and steps). The optimizer is handed the scaler
    (gradient clipping works, as with :func:`attach_native_scaler`).

    Args:
        device (str, optional): the GradScaler's device (default: "cuda").
        enabled (bool, optional): scale the loss (AMP with float16); False leaves the
            loss as it is (default: True).

    Raises:
        TypeError: (at a call) the optimizer is not an :class:`AdaHessian` or a
            framework's wrapper of one.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, device: str = "cuda", enabled: bool = True) -> None:
        self._scaler = torch.amp.GradScaler(device, enabled=enabled)

    def __call__(self, loss: torch.Tensor, optimizer: Any, clip_grad: float | None = None, clip_mode: str = "norm",
                 parameters: Any = None, create_graph: bool = False, need_update: bool = True) -> None:
        # create_graph is train.py's is_second_order flag: optimizer.backward decides per step.
        adahessian = unwrap(optimizer)
        adahessian.attach_grad_scaler(self._scaler if self._scaler.is_enabled() else None)
        adahessian.backward(self._scaler.scale(loss))
        if need_update:
            if clip_grad is not None:
                self._scaler.unscale_(optimizer)
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            self._scaler.step(optimizer)
            self._scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._scaler.load_state_dict(state_dict)


def attach_ddp(model: torch.nn.parallel.DistributedDataParallel, optimizer: Any) -> None:
    """Let ``optimizer`` average across the ranks for the ``DistributedDataParallel``
    ``model`` (timm's ``train.py --distributed`` wraps it; call this once after): on the
    exact path every forward tells the wrapper not to sync (DDP decides at the forward,
    and its reducer has no double backward), and the optimizer's ``process_group``, when
    it has none, becomes the wrapper's group; on the finite-difference path DDP's reducer
    averages the plain gradients as usual.

    Raises:
        TypeError: ``model`` is not a ``DistributedDataParallel``, or the optimizer not an
            :class:`AdaHessian` (or a wrapper of one).
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"attach_ddp expects the DistributedDataParallel-wrapped model, got {type(model).__name__}")
    adahessian = unwrap(optimizer)

    def before_forward(_module: torch.nn.Module, _args: Any) -> None:
        if adahessian.hvp == "autograd":
            model.require_backward_grad_sync = False  # read at the end of DDP's forward
            if adahessian.process_group is None:
                adahessian.process_group = model.process_group

    model.module.register_forward_pre_hook(before_forward)
