"""AdaHessian for PyTorch: a drop-in second-order optimizer (Yao et al., AAAI 2021)."""

from . import _ops
from .attention import math_attention
from .buffers import buffers_kept
from .optimizer import AdaHessian

_ops.load_built()  # built kernels register now; never fails (backends say why, if need be)

__all__ = ["AdaHessian", "buffers_kept", "math_attention"]
__version__ = "0.1.0"
