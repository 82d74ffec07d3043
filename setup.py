"""Build script: the Python package and its compiled kernels
(``pip install --no-build-isolation -e .`` builds them against the installed torch):
``adahessian._C`` registers the operator schemas, ``adahessian._C_cpu_<capability>``
the CPU kernels, once per instruction set (adahessian/_build.py), and
``adahessian._C_cuda`` the CUDA kernels where torch is a CUDA build and nvcc is found;
beside them ``adahessian/_built_with.py`` records the torch they were built against."""

import importlib.util
import os
import threading
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# By path: the package cannot be imported before it is built (its __init__ loads the extensions).
_spec = importlib.util.spec_from_file_location("_adahessian_build", ROOT / "adahessian" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# torch.utils.cpp_extension fixes CUDA_HOME when imported: find the real toolkit first.
if (cuda_home := build.find_cuda_home()) is not None:
    os.environ.setdefault("CUDA_HOME", cuda_home)

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

common = dict(include_dirs=build.include_dirs(), extra_link_args=build.LD_FLAGS)
extensions = [
    CppExtension("adahessian._C", build.schema_sources(relative_to=ROOT), extra_compile_args=build.CXX_FLAGS, **common)
]
for capability in build.capabilities():
    extensions.append(
        CppExtension(
            f"adahessian.{build.kernel_module(capability)}",
            build.kernel_sources(relative_to=ROOT),
            extra_compile_args=build.CXX_FLAGS + build.CAPABILITY_FLAGS[capability],
            **common,
        )
    )
# The CUDA kernels: with a CUDA build of torch and nvcc, on a machine with a GPU, or
# anywhere with FORCE_CUDA=1 (the torchvision convention: compile without a GPU).
if torch.version.cuda and CUDA_HOME and (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"):
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCHS)
    extensions.append(
        CUDAExtension(
            f"adahessian.{build.CUDA_MODULE}",
            build.cuda_sources(relative_to=ROOT),
            include_dirs=build.include_dirs() + build.nvidia_wheel_includes(CUDA_HOME),
            extra_compile_args={"cxx": ["-O3"], "nvcc": build.NVCC_FLAGS},
        )
    )


class Build(BuildExtension):
    """One object directory per extension: the kernel builds compile the same sources
    with different flags. Per thread, so that `build_ext -j N` (extensions built side by
    side, as tools/gpu_check.py does) keeps them apart."""

    _per_thread = threading.local()

    @property
    def build_temp(self):
        return getattr(self._per_thread, "build_temp", None) or self._build_temp

    @build_temp.setter
    def build_temp(self, value):
        self._build_temp = value

    def finalize_options(self):
        super().finalize_options()
        # distutils skips a library newer than its sources, even one built against another
        # torch: never skip (torch does this too with ninja, whose header dependencies
        # then find the stale objects).
        self.force = True

    def build_extension(self, ext):
        self._per_thread.build_temp = os.path.join(self._build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self._per_thread.build_temp = None

    def run(self):
        super().run()  # into build_lib, then (in place, editable installs too) copied beside the sources
        # The record of the torch these libraries were built against, wherever they went
        # (adahessian._ops reads it before loading them).
        record = build.record_source(build.torch_build(torch))
        folders = [Path(self.build_lib, "adahessian")]
        if self.inplace:
            folders.append(Path(self.get_finalized_command("build_py").get_package_dir("adahessian")))
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{build.RECORD_MODULE}.py").write_text(record)


setup(ext_modules=extensions, cmdclass={"build_ext": Build})
