"""Lists of tensors split by device: every multi-tensor call (foreach op, kernel launch)
takes the tensors of one device."""

from __future__ import annotations

import torch
from torch import Tensor


def by_device(tensors: list[Tensor]) -> dict[torch.device, list[int]]:
    """Positions of ``tensors`` by device, in order."""
    groups: dict[torch.device, list[int]] = {}
    for n, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(n)
    return groups
