"""`make gpu-check OUT=folder`: on a machine with a GPU (and no network), build the
extensions in place against the torch that is installed, prove that the built CUDA
library loads, run the CUDA tests, run the GPU benchmark, check the kernels' memory
accesses with compute-sanitizer where it exists, and write OUT/results.json,
OUT/table.md and OUT/log.txt (every phase's output).

    python3 tools/gpu_check.py --out OUT

Each phase has a time limit, and results.json is rewritten after every phase, so a run
cut short still says how far it got. Where the sources arrive without their .git folder,
pass the commit as ADAHESSIAN_COMMIT=<sha>.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as `python3 tools/gpu_check.py`, without the checkout on sys.path: beyond the standard
# library and torch it loads only _build.py, by path as setup.py does (importing the
# package would load the extensions before the build).
_spec = importlib.util.spec_from_file_location("_adahessian_build", ROOT / "adahessian" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

# The GPU target of tests/test_cuda.py (the emulated one runs in CI).
CUDA_TESTS = ["tests/test_cuda.py", "-k", "not emulated and not thread_order"]
# Small cases whose every launch compute-sanitizer instruments, each tensor its own
# allocation (memcheck sees an access past an allocation's end, not past a view's end
# inside one buffer: tests/test_cuda.py's view tests check their margins themselves):
# every op, the fused step with and without conv-kernel averaging (channels-last then),
# float32 (vectorised packs) and float64.
SANITIZED_TESTS = ["tests/test_cuda.py", "-k", "not emulated and (rademacher_is or accumulate_is or "
                   "functional_step and 1.0 and (float32 or float64))"]
# The phases in order; each one's own limit, the time each later phase keeps for itself
# (an earlier phase that runs long cannot starve it), and one limit for the whole check
# (a device command may run 10 minutes, and the machine's time is shared by every try).
PHASES = ("build", "load", "tests", "bench", "sanitizer")
LIMITS_S = dict(build=200, load=60, tests=200, bench=150, sanitizer=120)
RESERVED_S = dict(build=0, load=15, tests=90, bench=80, sanitizer=80)
TOTAL_S = 480

# Run in the harness's environment before the load phase: the built CUDA library must
# load as it is, or the tests would JIT-build it silently inside their own time limit.
LOAD_CHECK = (
    "import adahessian, torch; from adahessian import _build, _ops; "
    "assert _ops._built_error is None, _ops._built_error; "
    "assert _ops._has_kernels('CUDA'), 'the built library registered no CUDA kernels'; "
    "import importlib.util as u; print('loaded', u.find_spec('adahessian.' + _build.CUDA_MODULE).origin, "
    "'on', torch.cuda.get_device_name())"
)


def phase_limit(name: str, now: float, deadline: float) -> int:
    """Seconds phase `name` may run from `now`: its own limit, within what the whole
    check has left once the later phases' reserved time is set aside."""
    later = sum(RESERVED_S[p] for p in PHASES[PHASES.index(name) + 1 :])
    return max(1, min(LIMITS_S[name], round(deadline - now - later)))


def child_env(env: dict | None = None, **extra) -> dict:
    """The phases' environment: the checkout ahead of PYTHONPATH, not instead of it
    (wheels carried in by PYTHONPATH must stay importable)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # Deterministic cuBLAS (the per-step tests compare two model copies bit for bit); must
    # be set before CUDA initialises, so here rather than in the tests.
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run(cmd, out: Path, name: str, deadline: float, **env) -> dict:
    """Run cmd in the repository root within its phase_limit, appending its output to OUT/log.txt; returns exit code (None when cut
    off), seconds and the output's tail."""
    start = time.monotonic()
    limit = phase_limit(name, start, deadline)
    # A session of its own: a cut-off phase takes its children (ninja, nvcc) with it.
    # errors="replace": one undecodable byte from a compiler must not lose the phase's output.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=limit)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        code, text = None, text + f"\n[{name}] cut off after {limit} s\n"
    seconds = round(time.monotonic() - start)
    with open(out / "log.txt", "a") as log:
        log.write(f"\n===== {name}: {' '.join(map(str, cmd))} (exit {code}, {seconds} s)\n{text}")
    tail = "\n".join(text.strip().splitlines()[-15:])
    print(f"[{name}] exit {code} in {seconds} s\n{tail}\n", flush=True)
    return dict(exit=code, seconds=seconds, tail=tail)


PYTEST_OUTCOMES = ("passed", "failed", "skipped", "error", "errors")


def pytest_counts(tail: str) -> dict:
    return {k: int(n) for n, k in re.findall(rf"(\d+) ({'|'.join(PYTEST_OUTCOMES)})\b", tail)}


def source_commit() -> str:
    """The commit the sources were built from, for results files: ADAHESSIAN_COMMIT where
    they travelled without their .git folder, else git's answer, else "unknown"."""
    if os.environ.get("ADAHESSIAN_COMMIT"):
        return os.environ["ADAHESSIAN_COMMIT"]
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git on the machine
        return "unknown"
    return git.stdout.strip() if git.returncode == 0 else "unknown"


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found is None and (home := _build.find_cuda_home()):
        found = next((str(p) for p in Path(home).glob("**/compute-sanitizer") if p.is_file()), None)
    return found


def write(out: Path, result: dict) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = [f"# GPU check: {result.get('device')}, torch {result.get('torch')} (CUDA {result.get('cuda')}), "
             f"commit {result['commit'][:10]}, {result['date']}", ""]
    for phase in PHASES:
        if phase in result:
            r = result[phase]
            counts = ", ".join(f"{v} {k}" for k, v in r.items() if k in PYTEST_OUTCOMES)
            table.append(f"- {phase}: exit {r['exit']} ({r['seconds']} s){'; ' + counts if counts else ''}")
    if (out / "bench_gpu.md").exists():
        table += ["", (out / "bench_gpu.md").read_text()]
    (out / "table.md").write_text("\n".join(table) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text("")
    deadline = time.monotonic() + TOTAL_S
    py = sys.executable
    import torch  # adahessian's extensions are not loaded by this

    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=source_commit(),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  torch=torch.__version__, cuda=torch.version.cuda)
    jobs = str(os.cpu_count() or 1)
    # Extensions built side by side (-j), each ninja build with every core (MAX_JOBS).
    env = dict(FORCE_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", jobs))
    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())  # this GPU's only
    result["build"] = run([py, "setup.py", "build_ext", "--inplace", "-j", jobs], out, "build", deadline, **env)
    write(out, result)

    if result["build"]["exit"] == 0:
        # ADAHESSIAN_JIT=0: the built library or nothing (never a silent JIT build).
        result["load"] = run([py, "-c", LOAD_CHECK], out, "load", deadline, ADAHESSIAN_JIT="0")
        write(out, result)
    if result["build"]["exit"] != 0 or result["load"]["exit"] != 0:  # the tests would JIT-build the same sources
        print((out / "table.md").read_text())
        return 1

    result["tests"] = run([py, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", *CUDA_TESTS],
                          out, "tests", deadline)
    result["tests"].update(pytest_counts(result["tests"]["tail"]))
    write(out, result)

    result["bench"] = run([py, "-m", "benchmarks.bench_gpu", "--out", str(out)], out, "bench", deadline,
                          ADAHESSIAN_COMMIT=result["commit"])
    if (out / "bench_gpu.json").exists():
        result["bench"]["results"] = json.loads((out / "bench_gpu.json").read_text())
    write(out, result)

    tool = sanitizer()
    if tool is not None and deadline - time.monotonic() > 30:
        # Without torch's caching allocator every tensor is its own allocation, so an
        # access past a tensor's end is one that memcheck sees.
        result["sanitizer"] = run([tool, "--tool", "memcheck", "--error-exitcode", "1", py, "-m", "pytest", "-q",
                                   "-p", "no:cacheprovider", *SANITIZED_TESTS], out, "sanitizer", deadline,
                                  PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        result["sanitizer"].update(pytest_counts(result["sanitizer"]["tail"]))
    else:
        reason = "compute-sanitizer not found" if tool is None else "no time left"
        result["sanitizer"] = dict(exit=None, seconds=0, tail=reason)
    write(out, result)
    print((out / "table.md").read_text())
    return 0 if all(result[p]["exit"] == 0 for p in ("build", "load", "tests", "bench")) else 1


if __name__ == "__main__":
    sys.exit(main())
