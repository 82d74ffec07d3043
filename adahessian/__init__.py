"""AdaHessian for PyTorch: a drop-in second-order optimizer (Yao et al., AAAI 2021)."""

from . import _ops
from .attention import math_attention
from .optimizer import AdaHessian

_ops.load_built()  # built kernels register now; never fails (backends say why, if need be)

__all__ = ["AdaHessian", "math_attention"]
__version__ = "0.1.0"
