"""`make gpu-check OUT=folder`: on a machine with a GPU (and no network), build the
extensions in place against the torch that is installed, run the CUDA tests, run the GPU
benchmark, and write OUT/results.json and OUT/table.md.

    python benchmarks/gpu_check.py --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_TESTS = ["tests/test_cuda.py"]


def run(cmd, out: Path, name: str, **env) -> tuple[int, float, str]:
    """Run cmd in the repository root, logging to OUT/name.log; (exit code, seconds, tail)."""
    start = time.monotonic()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    print(f"[{name}] exit {proc.returncode} in {time.monotonic() - start:.0f} s\n{tail}\n", flush=True)
    return proc.returncode, time.monotonic() - start, tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    result["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    code, seconds, tail = run([py, "setup.py", "build_ext", "--inplace"], out, "build", FORCE_CUDA="1")
    result["build"] = dict(exit=code, seconds=round(seconds), tail=tail)
    import torch  # after the build: its import does not depend on it

    result.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  torch=torch.__version__, cuda=torch.version.cuda)
    code, seconds, tail = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS], out, "tests")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    result["tests"] = dict(exit=code, seconds=round(seconds), **counts)
    code, seconds, tail = run([py, "benchmarks/bench_gpu.py", "--out", str(out)], out, "bench")
    result["bench_exit"] = code
    bench = out / "bench_gpu.json"
    if bench.exists():
        result["bench"] = json.loads(bench.read_text())
    (out / "results.json").write_text(json.dumps(result, indent=2))

    table = [f"# GPU check: {result['device']}, torch {result['torch']} (CUDA {result['cuda']}), "
             f"commit {result['commit'][:10]}, {result['date']}", "",
             f"- build: exit {result['build']['exit']} ({result['build']['seconds']} s)",
             f"- CUDA tests: exit {result['tests']['exit']}, "
             + ", ".join(f"{v} {k}" for k, v in result["tests"].items() if k not in ("exit", "seconds")), ""]
    if (out / "bench_gpu.md").exists():
        table.append((out / "bench_gpu.md").read_text())
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0 if result["build"]["exit"] == 0 and result["tests"]["exit"] == 0 and result["bench_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
