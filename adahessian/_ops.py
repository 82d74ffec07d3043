"""Loads the compiled kernels behind ``torch.ops.adahessian`` (schemas: csrc/ops.cpp).

The libraries: the schemas (``adahessian._C``), the CPU kernels built for the
instruction set torch runs with (``adahessian._C_cpu_<capability>``, see _build.py) and,
where they were built, the CUDA kernels (``adahessian._C_cuda``). Built extensions
(``pip install --no-build-isolation -e .``) load eagerly at ``import adahessian`` (a
few dlopen calls: the kernels are registered right after import) and never make the
import fail; only into the torch their build recorded (``_built_with.py``), else not at
all, with one warning. Kernels still missing for a device type are JIT-built from the
same sources with ``torch.utils.cpp_extension.load`` at the first fused use on that
device type. ``ADAHESSIAN_JIT=1`` skips the built extensions.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import warnings
from pathlib import Path

import torch

from . import _build

JIT_ENV = "ADAHESSIAN_JIT"
OPS = ("rademacher_", "accumulate_hessian_", "fused_step_")
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

_built_error: str | None = None  # why the built extensions did not load, if they did not
_jit_errors: dict[str, str | None] = {}  # per device type: why the JIT build failed, if it did
_fakes_registered = False
_ready: set[str] = set()  # device types whose kernels are registered (a per-step lookup)


def load_built() -> None:
    """Load the built extensions that exist (called once, at import)."""
    global _built_error
    if os.environ.get(JIT_ENV) == "1":
        _built_error = f"{JIT_ENV}=1 skips the built extensions"
        return
    capability = _build.capability_for(torch.backends.cpu.get_cpu_capability())
    modules = [_build.kernel_module(capability), _build.CUDA_MODULE]
    specs = [s for s in (importlib.util.find_spec(f"{__package__}.{m}") for m in modules) if s is not None]
    schemas = importlib.util.find_spec(f"{__package__}._C")
    if schemas is None or not specs:
        _built_error = f"the extension adahessian.{_build.kernel_module(capability)} is not built"
        return
    _built_error = _foreign_build(Path(schemas.origin).with_name(f"{_build.RECORD_MODULE}.py"))
    if _built_error is not None:
        return
    try:
        from . import _C  # noqa: F401  (loading the library registers the schemas)

        for spec in specs:
            torch.ops.load_library(spec.origin)
    except Exception as err:  # a broken build: fall back, never fail the import
        _built_error = f"the built extensions do not load ({type(err).__name__}: {err})"
        return
    _register_fakes()


def _foreign_build(record_path: Path) -> str | None:
    """None when the build's record beside the libraries names the running torch, else why
    they must not load (warned once). Read before any library loads: loading one built
    against another torch is itself undefined behaviour (its symbols bind to another ABI).
    Read by path, not imported: an import could find another build's record."""
    running = _build.torch_build(torch)
    try:
        record = runpy.run_path(str(record_path))
        built = (record["TORCH_VERSION"], record["CUDA_VERSION"])
    except (OSError, SyntaxError, KeyError):  # missing, or not what setup.py writes
        built = None
    if built == running:
        return None
    if built is None:
        what = f"carry no record of the torch they were built against ({__package__}/{_build.RECORD_MODULE}.py)"
    else:
        what = f"were built against {_describe(built)}, not the running {_describe(running)}"
    if _build.CSRC.is_dir():
        then = "the first fused step JIT-compiles them from the sources against this torch, where a compiler is found"
    else:
        then = "backend='auto' uses the reference path and backend='fused' raises"
    warnings.warn(
        f"adahessian's compiled kernels {what}, so they are not loaded (a C++ extension runs only with the "
        f"torch build it was compiled against); {then}. Fix: reinstall adahessian against this torch, "
        "`pip install --no-build-isolation .` in its source checkout or sdist (README, \"Install\").",
        stacklevel=4,  # the user's `import adahessian` (warnings skips importlib's frames)
    )
    return f"the built extensions {what}, so they are not loaded (reinstall: pip install --no-build-isolation .)"


def _describe(build: tuple[str, str | None]) -> str:
    return f"torch {build[0]} ({f'CUDA {build[1]}' if build[1] else 'no CUDA'})"


def load_error(device_type: str = "cpu") -> str | None:
    """None when the kernels run on this device type, else why not (a missing kernel is
    JIT-built once per process and device type)."""
    if device_type in _ready:
        return None
    key = DISPATCH_KEYS.get(device_type)
    if key is None:
        return f"no AdaHessian kernels exist for device type {device_type!r}"
    if device_type not in _jit_errors and not _has_kernels(key):
        _jit_errors[device_type] = _jit_build(device_type)
        if _jit_errors[device_type] is None:
            _register_fakes()
    if _has_kernels(key):
        _ready.add(device_type)
        return None
    reasons = [r for r in (_built_error, _jit_errors[device_type]) if r]
    return "; ".join(reasons) if reasons else None


def ops(device_type: str = "cpu"):
    """``torch.ops.adahessian``, loaded; RuntimeError when the kernels are unavailable."""
    error = load_error(device_type)
    if error is not None:
        raise RuntimeError(f"the fused AdaHessian kernels are not available: {error}")
    return torch.ops.adahessian


def _has_kernels(dispatch_key: str) -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"adahessian::{op}", dispatch_key) for op in OPS)
    except RuntimeError:  # the schemas are not registered yet
        return False


def _jit_build(device_type: str) -> str | None:
    if not _build.CSRC.is_dir():
        return f"no sources to JIT-build from ({_build.CSRC} is missing)"
    if device_type == "cuda" and (cuda_home := _build.find_cuda_home()):
        os.environ.setdefault("CUDA_HOME", cuda_home)  # before cpp_extension reads it
    try:
        from torch.utils import cpp_extension

        common = dict(extra_include_paths=_build.include_dirs(), extra_ldflags=_build.LD_FLAGS, is_python_module=False)
        if not _has_schemas():
            cpp_extension.load(
                name="adahessian_C", sources=_build.schema_sources(), extra_cflags=_build.CXX_FLAGS, **common
            )
        if device_type == "cpu":
            capability = _build.capability_for(torch.backends.cpu.get_cpu_capability())
            cpp_extension.load(
                name=f"adahessian{_build.kernel_module(capability)}",
                sources=_build.kernel_sources(),
                extra_cflags=_build.CXX_FLAGS + _build.CAPABILITY_FLAGS[capability],
                **common,
            )
        else:
            if not torch.version.cuda or cpp_extension.CUDA_HOME is None:
                return "the JIT build of the CUDA kernels needs a CUDA build of torch and the CUDA toolkit (nvcc)"
            cpp_extension.load(
                name=f"adahessian{_build.CUDA_MODULE}",
                sources=_build.cuda_sources(),
                extra_cuda_cflags=_build.NVCC_FLAGS,
                **dict(common, extra_include_paths=_build.include_dirs()
                       + _build.nvidia_wheel_includes(cpp_extension.CUDA_HOME)),
            )
    except Exception as err:  # no compiler, no ninja, a compile error: all mean "unavailable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"the JIT build failed ({type(err).__name__}: {first_line})"
    return None


def _has_schemas() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("adahessian::fused_step_", "")
        return True
    except RuntimeError:
        return False


def _register_fakes() -> None:
    # Every op mutates its arguments in place and returns nothing, so the fake (meta)
    # implementation that torch.compile traces through has nothing to compute.
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True
    for name in OPS:
        torch.library.register_fake(f"adahessian::{name}")(_returns_nothing)


def _returns_nothing(*args, **kwargs) -> None:
    return None
