"""Loads the compiled kernels behind ``torch.ops.adahessian`` (schemas: csrc/ops.cpp).

Two libraries: the schemas (``adahessian._C``) and the CPU kernels built for the
instruction set torch runs with (``adahessian._C_cpu_<capability>``, see _build.py).
The built extensions (``pip install --no-build-isolation -e .``) come first; without
them (a source checkout, a dev loop) ``torch.utils.cpp_extension.load`` JIT-builds the
same sources into torch's extension cache. ``ADAHESSIAN_JIT=1`` skips the built
extensions. Nothing loads at ``import adahessian``: the first use of the fused backend
does, once per process.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _build

JIT_ENV = "ADAHESSIAN_JIT"
OPS = ("rademacher_", "accumulate_hessian_", "fused_step_")

_error: str | None = None
_attempted = False


def load_error() -> str | None:
    """None when the ops are registered, else why they are not (tried once per process)."""
    global _error, _attempted
    if not _attempted:
        _attempted = True
        _error = _load()
        if _error is None:
            _register_fakes()
    return _error


def ops():
    """``torch.ops.adahessian``, loaded; RuntimeError when the kernels are unavailable."""
    error = load_error()
    if error is not None:
        raise RuntimeError(f"the fused AdaHessian kernels are not available: {error}")
    return torch.ops.adahessian


def _load() -> str | None:
    capability = _build.capability_for(torch.backends.cpu.get_cpu_capability())
    reasons = []
    if os.environ.get(JIT_ENV) == "1":
        reasons.append(f"{JIT_ENV}=1 skips the built extensions")
    elif (kernels := importlib.util.find_spec(f"{__package__}.{_build.kernel_module(capability)}")) is None:
        reasons.append(f"the extension adahessian.{_build.kernel_module(capability)} is not built")
    else:
        try:
            from . import _C  # noqa: F401  (loading the library registers the schemas)

            torch.ops.load_library(kernels.origin)
            return None
        except (ImportError, OSError) as err:
            reasons.append(f"the built extensions do not load ({err})")
    if not _build.CSRC.is_dir():
        return "; ".join([*reasons, f"no sources to JIT-build from ({_build.CSRC} is missing)"])
    try:
        from torch.utils import cpp_extension

        common = dict(
            extra_include_paths=_build.include_dirs(), extra_ldflags=_build.LD_FLAGS, is_python_module=False
        )
        cpp_extension.load(name="adahessian_C", sources=_build.schema_sources(), extra_cflags=_build.CXX_FLAGS, **common)
        cpp_extension.load(
            name=f"adahessian{_build.kernel_module(capability)}",
            sources=_build.kernel_sources(),
            extra_cflags=_build.CXX_FLAGS + _build.CAPABILITY_FLAGS[capability],
            **common,
        )
    except Exception as err:  # no compiler, no ninja, a compile error: all mean "unavailable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return "; ".join([*reasons, f"the JIT build failed ({type(err).__name__}: {first_line})"])
    return None


def _register_fakes() -> None:
    # Every op mutates its arguments in place and returns nothing, so the fake (meta)
    # implementation that torch.compile traces through has nothing to compute.
    for name in OPS:
        torch.library.register_fake(f"adahessian::{name}")(_returns_nothing)


def _returns_nothing(*args, **kwargs) -> None:
    return None
