"""Packaging a user can trust: one version (adahessian.__version__, which the metadata
reads), py.typed, and an sdist that carries everything the build needs and builds in a
clean venv with --no-build-isolation (the convention for torch extensions)."""

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import adahessian

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_has_one_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "adahessian.__version__"}
    # The installed metadata (editable or not) was read from the same attribute.
    assert importlib.metadata.version("adahessian") == adahessian.__version__


def test_the_package_is_marked_typed():
    assert (Path(adahessian.__file__).parent / "py.typed").is_file()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    pytest.importorskip("build", reason="the test extra installs `build`")
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (path,) = out.glob("adahessian-*.tar.gz")
    return path


@pytest.mark.tooling
def test_the_sdist_holds_the_sources_headers_and_subpackages(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"adahessian-{adahessian.__version__}/PKG-INFO").read().decode()
    tracked = subprocess.run(["git", "ls-files", "csrc", "adahessian"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # a git checkout: every tracked source and header is in the sdist
        assert set(tracked.stdout.split()) - names == set()
    for needed in ("setup.py", "pyproject.toml", "adahessian/py.typed", "adahessian/integrations/timm.py"):
        assert needed in names
    assert f"Version: {adahessian.__version__}\n" in pkg_info
    assert "Classifier: Typing :: Typed" in pkg_info


@pytest.mark.tooling
@pytest.mark.skipif(
    os.environ.get("ADAHESSIAN_TEST_SDIST") != "1",
    reason="compiles the CPU kernels (minutes): set ADAHESSIAN_TEST_SDIST=1 (make test-frameworks does)",
)
def test_the_sdist_builds_in_a_clean_venv_without_build_isolation(sdist, tmp_path):
    """A venv without adahessian, seeing this environment's torch, setuptools and ninja
    through a .pth file (what --no-build-isolation expects to find installed)."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(purelib, "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "PYTHONPATH")}
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", str(sdist)],
        check=True, env=env, cwd=tmp_path,
    )
    check = (
        "import pathlib, torch, adahessian, adahessian.integrations; from adahessian import backends; "
        f"assert pathlib.Path(adahessian.__file__).is_relative_to({purelib!r}), adahessian.__file__; "
        "assert (pathlib.Path(adahessian.__file__).parent / 'py.typed').is_file(); "
        "assert any(pathlib.Path(adahessian.__file__).parent.glob('_C_cpu_*.so')), 'no compiled kernels'; "
        "assert backends.fused_unavailable_reason(torch.device('cpu')) is None; "
        "print(adahessian.__version__)"
    )
    result = subprocess.run([python, "-c", check], check=True, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.strip() == adahessian.__version__
