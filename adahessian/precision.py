"""The precision rule (docs/algorithm.md, section 1): float32 and float64 parameters
compute in their own dtype; bfloat16 and float16 parameters compute in float32 and keep
m, v and D in float32."""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a parameter's m, v and D (and of its arithmetic)."""
    return torch.float32 if param.dtype in LOW_PRECISION else param.dtype
