"""Module buffers kept across a forward pass: the extra evaluations of a finite
difference, and a sub-batch's forward for ``AdaHessian.hessian_backward``, must not
update batch-norm running statistics a second time (README, "Gradient accumulation and
a sub-batch Hessian")."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class buffers_kept:  # noqa: N801 (a context manager, used as a function)
    """Within: every module that runs in training mode has its buffers (and its
    submodules') copied before its forward; on exit they are written back in place, so
    the forward passes inside leave running statistics (``running_mean``,
    ``running_var``, ``num_batches_tracked``) as they were. The forward itself uses the
    batch's statistics as usual. The backward of such a forward belongs inside too
    (batch norm's backward reads the buffers it saved; writing them back first makes
    autograd refuse it).

    Example (a sub-batch Hessian on a BatchNorm model)::

        with adahessian.buffers_kept():
            optimizer.hessian_backward(loss_fn(model(x[:8]), y[:8]))
    """

    def __enter__(self) -> None:
        self.saved: dict[int, tuple[Tensor, Tensor]] = {}
        self.seen: set[int] = set()
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, _args: Any) -> None:
        if id(module) in self.seen or not module.training:
            return
        for sub in module.modules():
            self.seen.add(id(sub))
        for buffer in module.buffers():
            if id(buffer) not in self.saved:
                self.saved[id(buffer)] = (buffer, buffer.detach().clone())

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        with torch.no_grad():
            for buffer, value in self.saved.values():
                buffer.copy_(value)
