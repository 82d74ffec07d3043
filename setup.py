"""Build script: the Python package and its compiled kernels
(``pip install --no-build-isolation -e .`` builds them against the installed torch):
``adahessian._C`` registers the operator schemas, ``adahessian._C_cpu_<capability>``
the CPU kernels, once per instruction set (adahessian/_build.py)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_adahessian_build", ROOT / "adahessian" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

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
# CUDA kernels (csrc/cuda) will add a CUDAExtension here.


class Build(BuildExtension):
    """One object directory per extension: the kernel builds compile the same sources
    with different flags."""

    def build_extension(self, ext):
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp


setup(ext_modules=extensions, cmdclass={"build_ext": Build})
