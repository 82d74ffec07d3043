"""How the compiled kernels are built: the sources and flags that ``setup.py`` (the
extensions ``adahessian._C*``) and the JIT build in :mod:`adahessian._ops` share.
Imports nothing from the package, so ``setup.py`` loads it by path before installing."""

from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# -fopenmp: at::parallel_for is an inline OpenMP region compiled into the kernels (they
# link libgomp.so.1, the soname of the OpenMP runtime torch already loaded, so one pool).
# -fno-math-errno: lets sqrt vectorise, as in torch's own build.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LD_FLAGS = ["-fopenmp"]

# The CPU kernels are built once per instruction set, as ATen builds its own, and the
# loader picks the build for the capability torch runs with
# (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY overrides).
# CPU_CAPABILITY names the at::vec namespace, so builds never share a symbol.
CAPABILITY_FLAGS = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
}


def capabilities() -> list[str]:
    """The kernel builds this machine's compiler targets."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return list(CAPABILITY_FLAGS) if x86 else ["DEFAULT"]


def capability_for(torch_capability: str) -> str:
    """The kernel build to load when torch reports ``torch_capability``."""
    return torch_capability if torch_capability in capabilities() else "DEFAULT"


def kernel_module(capability: str) -> str:
    """Name of the CPU kernels' extension module for one capability (under adahessian)."""
    return f"_C_cpu_{capability.lower()}"


def schema_sources(relative_to: Path | None = None) -> list[str]:
    return _paths(sorted(CSRC.glob("*.cpp")), relative_to)


def kernel_sources(relative_to: Path | None = None) -> list[str]:
    return _paths(sorted((CSRC / "cpu").glob("*.cpp")), relative_to)


def include_dirs() -> list[str]:
    return [str(CSRC / "include")]  # absolute: compilers run in the build directory


def _paths(files: list[Path], relative_to: Path | None) -> list[str]:
    return [str(f.relative_to(relative_to) if relative_to else f) for f in files]
