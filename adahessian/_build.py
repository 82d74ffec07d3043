"""How the compiled kernels are built: the sources and flags that ``setup.py`` (the
extensions ``adahessian._C*``) and the JIT build in :mod:`adahessian._ops` share.
Imports nothing from the package, so ``setup.py`` loads it by path before installing."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sysconfig
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


# The compiled sources, under csrc/, listed rather than globbed: a new file joins a
# library on purpose (tests/test_build.py fails on a source that no list names).
SCHEMA_SOURCES = ["ops.cpp"]
KERNEL_SOURCES = ["cpu/ops_cpu.cpp"]
CUDA_SOURCES = ["cuda/ops_cuda.cu"]


def schema_sources(relative_to: Path | None = None) -> list[str]:
    return _paths(SCHEMA_SOURCES, relative_to)


def kernel_sources(relative_to: Path | None = None) -> list[str]:
    return _paths(KERNEL_SOURCES, relative_to)


def include_dirs() -> list[str]:
    return [str(CSRC / "include")]  # absolute: compilers run in the build directory


def _paths(names: list[str], relative_to: Path | None) -> list[str]:
    files = [CSRC / name for name in names]
    return [str(f.relative_to(relative_to) if relative_to else f) for f in files]


# ------------------------------------------------------------ the torch a build is for

# setup.py's build_ext writes this module next to the libraries it compiles; _ops reads it
# before it loads any of them (README, "Install"). Generated, never committed.
RECORD_MODULE = "_built_with"


def torch_build(torch) -> tuple[str, str | None]:
    """What names the torch binary an extension is compiled against: the full version
    string, its local suffix included (``2.13.0+cpu`` and ``2.13.0+cu130`` are builds
    with different configurations), and the CUDA version (a source build of torch may
    carry no suffix). torch promises no C++ ABI between builds, so only an equal pair
    may load a library (a patch release may change an inline function or a struct)."""
    return str(torch.__version__), torch.version.cuda


def record_source(build: tuple[str, str | None]) -> str:
    """The text of the generated record for ``torch_build(torch)``."""
    return (
        "# Written by setup.py's build_ext: the torch the compiled extensions beside this file\n"
        "# were built against; adahessian loads them only into this torch (README, \"Install\").\n"
        f"TORCH_VERSION = {build[0]!r}\nCUDA_VERSION = {build[1]!r}\n"
    )


# ------------------------------------------------------------------------------ CUDA

CUDA_MODULE = "_C_cuda"
# Beyond torch's own nvcc flags (half/bfloat16 operators off, relaxed constexpr); no
# --use_fast_math: its approximate division and pow would break agreement with the CPU.
NVCC_FLAGS = ["-O3"]
# Ampere and Hopper, plus PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_sources(relative_to: Path | None = None) -> list[str]:
    return _paths(CUDA_SOURCES, relative_to)


def find_cuda_home() -> str | None:
    """The CUDA toolkit's root. torch guesses it from the folder above ``nvcc``, which is
    wrong where ``nvcc`` on PATH is a wrapper script (then linking fails with "cannot
    find -lcudart"); ``nvcc --dryrun`` prints the real one (``TOP=``)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        dryrun = None
    for line in (dryrun.stderr + dryrun.stdout).splitlines() if dryrun else []:
        if (m := re.match(r"#\$ TOP=(.*)", line.strip())) and (Path(m[1]) / "include" / "cuda_runtime.h").exists():
            return str(Path(m[1]).resolve())
    for candidate in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (candidate / "include" / "cuda_runtime.h").exists():
            return str(candidate)
    return None


def nvidia_wheel_includes(cuda_home: str | None) -> list[str]:
    """Headers that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...) but a
    minimal toolkit may lack: the NVIDIA wheels a CUDA build of torch installs have them.
    Only for such a toolkit: a full one keeps its own headers, not a wheel's of another
    minor version ahead of them."""
    if cuda_home is not None and (Path(cuda_home) / "include" / "cusparse.h").exists():
        return []
    folders = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        folders += sorted(str(p) for p in Path(site).glob("nvidia/*/include") if p.is_dir())
        folders += sorted(str(p) for p in Path(site).glob("nvidia/cu*/include") if p.is_dir())
    return list(dict.fromkeys(folders))
