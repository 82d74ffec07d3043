"""AdaHessian for PyTorch: a drop-in second-order optimizer (Yao et al., AAAI 2021)."""

from .attention import math_attention
from .optimizer import AdaHessian

__all__ = ["AdaHessian", "math_attention"]
__version__ = "0.1.0"
