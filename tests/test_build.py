"""What setup.py and the JIT build compile, and how they find the CUDA toolkit and its
headers (the machine quirks the CUDA build must survive without a GPU)."""

import os
import stat
from collections import Counter

import pytest

from adahessian import _build

pytestmark = pytest.mark.tooling


# What a compiler is handed; headers (.h, .cuh) are only included.
COMPILED_SUFFIXES = {".c", ".cc", ".cpp", ".cxx", ".cu"}


def test_every_compiled_source_under_csrc_is_listed_exactly_once():
    listed = Counter(_build.SCHEMA_SOURCES + _build.KERNEL_SOURCES + _build.CUDA_SOURCES)
    on_disk = {p.relative_to(_build.CSRC).as_posix() for p in _build.CSRC.rglob("*") if p.suffix in COMPILED_SUFFIXES}
    assert {name for name, n in listed.items() if n > 1} == set(), "listed twice"
    assert on_disk - set(listed) == set(), "add each new source to one list in adahessian/_build.py"
    assert set(listed) - on_disk == set(), "listed but missing"


def _toolkit(root, *headers):
    (root / "include").mkdir(parents=True)
    for header in headers:
        (root / "include" / header).write_text("")
    return root


def test_the_toolkit_root_comes_from_nvcc_dryrun_not_a_wrapper_scripts_folder(tmp_path, monkeypatch):
    real = _toolkit(tmp_path / "real-toolkit", "cuda_runtime.h")
    (real / "bin").mkdir()
    wrapper = tmp_path / "wrappers" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    # Like the wrapper on this machine: nvcc's own dry run names the real root on stderr.
    wrapper.write_text(f"#!/bin/sh\necho '#$ _NVVM_BRANCH_=nvvm' >&2\necho '#$ TOP={real}/bin/..' >&2\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert _build.find_cuda_home() == str(real)
    monkeypatch.setenv("CUDA_HOME", "/explicit")
    assert _build.find_cuda_home() == "/explicit"


def test_wheel_headers_only_fill_in_for_a_minimal_toolkit(tmp_path):
    full = _toolkit(tmp_path / "full", "cuda_runtime.h", "cusparse.h")
    assert _build.nvidia_wheel_includes(str(full)) == []
    minimal = _toolkit(tmp_path / "minimal", "cuda_runtime.h")
    found = _build.nvidia_wheel_includes(str(minimal))
    assert all(os.path.isdir(f) and os.sep + "nvidia" + os.sep in f for f in found)
