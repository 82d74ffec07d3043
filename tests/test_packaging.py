"""Packaging a user can trust: one version (adahessian.__version__, which the metadata
reads), py.typed, an sdist that carries everything the build needs and builds a wheel
in a clean venv with --no-build-isolation (the convention for torch extensions), a
wheel that runs on its compiled kernels where only torch is installed, and built
libraries that load only into the torch their build recorded (README, "Install")."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import adahessian
from adahessian import _build

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
    # An in-place build's record of its torch stays out (each build writes its own).
    assert f"adahessian/{_build.RECORD_MODULE}.py" not in names
    assert f"Version: {adahessian.__version__}\n" in pkg_info
    assert "Classifier: Typing :: Typed" in pkg_info


# ------------------------------------------------------- the wheel, built from the sdist

def _venv(path: Path, sees: Path) -> tuple[Path, str]:
    """A venv without pip or adahessian that sees the packages in ``sees`` through a .pth
    file (no download); its python and its own site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(purelib, "seen.pth").write_text(f"{sees}\n")
    return python, purelib


def _clean_env(**extra) -> dict[str, str]:
    drop = ("FORCE_CUDA", "PYTHONPATH", "ADAHESSIAN_JIT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    """The wheel ``pip wheel --no-build-isolation`` builds from the sdist in a venv that sees
    this environment's torch, setuptools and ninja (what --no-build-isolation expects to
    find installed): the one compile of the CPU kernels in this file."""
    if os.environ.get("ADAHESSIAN_TEST_SDIST") != "1":
        pytest.skip("compiles the CPU kernels (minutes): set ADAHESSIAN_TEST_SDIST=1 (make test-frameworks does)")
    tmp = tmp_path_factory.mktemp("wheel")
    python, _ = _venv(tmp / "venv", Path(sysconfig.get_paths()["purelib"]))
    subprocess.run(
        [python, "-m", "pip", "wheel", "--quiet", "--no-build-isolation", "--no-deps", "--wheel-dir", "dist", str(sdist)],
        check=True, env=_clean_env(), cwd=tmp,
    )
    (path,) = (tmp / "dist").glob("adahessian-*.whl")
    return path


@pytest.mark.tooling
def test_the_sdist_builds_a_wheel_of_the_compiled_kernels_and_the_torch_they_are_for(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        record = z.read(f"adahessian/{_build.RECORD_MODULE}.py").decode()
        wheel_info = z.read(f"adahessian-{adahessian.__version__}.dist-info/WHEEL").decode()
    libraries = {Path(n).name.split(".")[0] for n in names if n.startswith("adahessian/_C") and n.endswith(".so")}
    assert libraries >= {"_C"} | {_build.kernel_module(c) for c in _build.capabilities()}
    assert record == _build.record_source(_build.torch_build(torch))
    assert "Root-Is-Purelib: false" in wheel_info  # tagged for this platform and Python
    assert {"adahessian/py.typed", "adahessian/integrations/timm.py"} <= names
    assert not [n for n in names if n.startswith("csrc/")]  # nothing to JIT-build from


def _link_torch_and_its_requirements(into: Path) -> None:
    """Links in ``into`` to this environment's torch and the distributions it requires
    (markers evaluated, no extras), and nothing else: what `pip install torch` leaves."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), ["torch"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        required = map(Requirement, dist.requires or [])
        todo += [r.name for r in required if r.marker is None or r.marker.evaluate({"extra": ""})]
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__") and f.suffix != ".pth"}:
            if not (into / top).exists():
                (into / top).symlink_to(site / top)


# Runs the quickstart in the current directory on the wheel's libraries (argv[1]: the
# venv's site-packages): loaded at import, no JIT build, no fallback.
QUICKSTART_ON_THE_WHEEL = """
import pathlib, runpy, sys, warnings
import adahessian
from adahessian import _ops
site = sys.argv[1]
assert pathlib.Path(adahessian.__file__).is_relative_to(site), adahessian.__file__
assert _ops._built_error is None and _ops._has_kernels("CPU"), _ops._built_error
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    runpy.run_path("quickstart.py", run_name="__main__")
assert not [str(w.message) for w in caught if "adahessian" in str(w.message).lower()], [str(w.message) for w in caught]
assert _ops._jit_errors == {} and "cpu" in _ops._ready
mapped = {pathlib.Path(line.split()[-1]).name.split(".")[0] for line in open("/proc/self/maps")
          if site in line and ".so" in line}
import adahessian.integrations
assert (pathlib.Path(adahessian.__file__).parent / "py.typed").is_file()
print("mapped", *sorted(mapped))
print(adahessian.__version__)
"""


@pytest.mark.tooling
def test_the_wheel_runs_the_quickstart_on_its_fused_kernels_where_only_torch_is_installed(wheel, tmp_path):
    (tmp_path / "torch-only").mkdir()
    _link_torch_and_its_requirements(tmp_path / "torch-only")
    python, purelib = _venv(tmp_path / "venv", tmp_path / "torch-only")
    subprocess.run(  # this environment's pip, installing into the venv
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index", "--no-deps", str(wheel)],
        check=True, env=_clean_env(), cwd=tmp_path,
    )
    elsewhere = tmp_path / "elsewhere"  # outside the checkout
    elsewhere.mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.py", elsewhere)
    result = subprocess.run(
        [python, "-c", QUICKSTART_ON_THE_WHEEL, purelib], env=_clean_env(OMP_NUM_THREADS="1"), cwd=elsewhere,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step")]
    assert len(losses) == 7 and losses[-1] < losses[0] / 4
    capability = _build.capability_for(torch.backends.cpu.get_cpu_capability())
    assert lines[-2].split() == ["mapped", "_C", _build.kernel_module(capability)]
    assert lines[-1] == adahessian.__version__


# ------------------------------------------- built libraries and the torch they are for

# Imports the package from argv[1], reports what loaded, then steps backend="auto".
LOAD_PROBE = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
with warnings.catch_warnings(record=True) as at_import:
    warnings.simplefilter("always")
    import adahessian
import torch
from adahessian import AdaHessian
mapped = [line for line in open("/proc/self/maps") if "/adahessian/_C" in line]
p = torch.nn.Parameter(torch.ones(3))
with warnings.catch_warnings(record=True) as at_step:
    warnings.simplefilter("always")
    opt = AdaHessian([p], backend="auto")
    (p * p).sum().backward(create_graph=True)
    opt.step()
try:
    AdaHessian([torch.nn.Parameter(torch.ones(3))], backend="fused")
    fused_error = None
except RuntimeError as err:
    fused_error = str(err)
print(json.dumps(dict(
    file=adahessian.__file__, loaded=bool(mapped), fused_error=fused_error, stepped=bool((p < 1).all()),
    at_import=[str(w.message) for w in at_import if "adahessian" in str(w.message)],
    at_step=[str(w.message) for w in at_step if "AdaHessian" in str(w.message)],
)))
"""


def _load_installed_copy(tmp_path, record: str | None, sources: bool = False, **env) -> dict:
    """Imports a copy of this package laid out as a wheel installs it, with its built
    libraries (linked) and ``record`` as its record of their torch (None: no record);
    with ``sources``, csrc/ beside it as in a checkout."""
    package = Path(adahessian.__file__).parent
    libraries = sorted(package.glob("_C*.so"))
    if not libraries:
        pytest.skip("no built extensions here (make setup builds them in place)")
    site = tmp_path / "site"
    shutil.copytree(package, site / "adahessian",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", f"{_build.RECORD_MODULE}.py"))
    for library in libraries:
        (site / "adahessian" / library.name).symlink_to(library)
    if record is not None:
        (site / "adahessian" / f"{_build.RECORD_MODULE}.py").write_text(record)
    if sources:
        (site / "csrc").symlink_to(_build.CSRC)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, str(site)], env=_clean_env(ADAHESSIAN_JIT="0", **env), cwd=tmp_path,
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site), report["file"]
    assert report["stepped"]
    return report


RUNNING = _build.torch_build(torch)
CUDA = f"CUDA {RUNNING[1]}" if RUNNING[1] else "no CUDA"
FIX = "pip install --no-build-isolation ."


def test_libraries_built_against_the_running_torch_load_at_import(tmp_path):
    report = _load_installed_copy(tmp_path, _build.record_source(RUNNING))
    assert report["loaded"] and report["fused_error"] is None
    assert report["at_import"] == [] and report["at_step"] == []


# Another release, and the same release built for another device (its local suffix).
OTHER_TORCH = [("2.0.0+cu118", "11.8"),
               (RUNNING[0].split("+")[0] + ("+cpu" if "+cu" in RUNNING[0] else "+cu130"), RUNNING[1])]


@pytest.mark.parametrize("built", OTHER_TORCH, ids=["another-release", "another-build"])
def test_libraries_built_against_another_torch_never_load_and_auto_falls_back(tmp_path, built):
    report = _load_installed_copy(tmp_path, _build.record_source(built))
    assert not report["loaded"]
    described = f"torch {built[0]} ({f'CUDA {built[1]}' if built[1] else 'no CUDA'})"
    (warning,) = report["at_import"]
    assert f"were built against {described}, not the running torch {RUNNING[0]} ({CUDA})" in warning
    assert "not loaded" in warning and FIX in warning
    assert "backend='auto' uses the reference path and backend='fused' raises" in warning
    (fallback,) = report["at_step"]
    assert described in fallback and "no sources to JIT-build from" in fallback
    assert fallback.endswith("using the reference path.")
    assert described in report["fused_error"] and FIX in report["fused_error"]


def test_libraries_without_a_record_never_load(tmp_path):
    report = _load_installed_copy(tmp_path, None)
    assert not report["loaded"]
    (warning,) = report["at_import"]
    assert f"carry no record of the torch they were built against (adahessian/{_build.RECORD_MODULE}.py)" in warning
    assert FIX in warning
    (fallback,) = report["at_step"]
    assert "carry no record" in fallback and fallback.endswith("using the reference path.")


def test_in_a_checkout_libraries_built_against_another_torch_give_way_to_a_jit_build(tmp_path):
    # The JIT build is attempted (CXX=/bin/false makes it fail fast), then auto falls back.
    report = _load_installed_copy(tmp_path, _build.record_source(OTHER_TORCH[0]), sources=True,
                                  CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path / "jit"))
    assert not report["loaded"]
    (warning,) = report["at_import"]
    assert "the first fused step JIT-compiles them from the sources against this torch" in warning
    (fallback,) = report["at_step"]
    assert "torch 2.0.0+cu118" in fallback and "JIT build failed" in fallback
