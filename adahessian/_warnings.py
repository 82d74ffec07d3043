"""Warnings attributed to the user's line: the first caller outside this package and
torch (whose optimizer hooks and decorators wrap ``step``), however deep the call."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

_INTERNAL = (str(Path(__file__).parent), str(Path(torch.__file__).parent))


def warn(message: str) -> None:
    """``warnings.warn(message)`` (a UserWarning) at the user's line."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
