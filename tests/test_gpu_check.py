"""`make gpu-check` runs where GPU time is scarce: what it selects and records must be
right before it gets there."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools import gpu_check

pytestmark = pytest.mark.tooling

ROOT = Path(__file__).resolve().parents[1]


def _collect(args):
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    return [line for line in result.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("selection", ["CUDA_TESTS", "SANITIZED_TESTS"])
def test_selections_pick_gpu_tests_only(selection):
    ids = _collect(getattr(gpu_check, selection))
    assert ids, f"{selection} selects no test"
    assert all("emulated" not in i and "thread_order" not in i for i in ids), ids
    if selection == "SANITIZED_TESTS":  # tensors of their own: memcheck sees past-the-end accesses
        assert not any("views_at_every" in i for i in ids) and any("functional_step" in i for i in ids), ids
    # Every GPU-target test of the module, and nothing else, in the main selection.
    if selection == "CUDA_TESTS":
        everything = _collect(["tests/test_cuda.py"])
        assert set(ids) == {i for i in everything if "emulated" not in i and "thread_order" not in i}
        assert sum("[cuda" in i for i in ids) > 100


def test_a_run_cut_short_still_writes_what_it_has(tmp_path):
    result = dict(date="2026-11-29T00:00:00+00:00", commit="0123456789abcdef", device="NVIDIA H200", torch="2.11.0",
                  cuda="13.0", build=dict(exit=0, seconds=71, tail=""),
                  tests=dict(exit=None, seconds=300, tail="", passed=120),
                  bench=dict(exit=0, seconds=40, tail="", results=dict(copy_gbs=4300.0, rows=[])))
    gpu_check.write(tmp_path, result)
    assert json.loads((tmp_path / "results.json").read_text()) == result
    table = (tmp_path / "table.md").read_text()
    assert "NVIDIA H200" in table and "commit 0123456789" in table
    assert "- build: exit 0 (71 s)" in table and "- tests: exit None (300 s); 120 passed" in table
    assert "- bench: exit 0 (40 s)\n" in table and "sanitizer" not in table


def test_pytest_counts_read_the_summary_line():
    assert gpu_check.pytest_counts("3 failed, 140 passed, 2 skipped, 1 error in 61.2s") == dict(
        failed=3, passed=140, skipped=2, error=1)


def test_a_phase_past_its_limit_is_cut_off_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.LIMITS_S, "tests", 2)
    marker = tmp_path / "grandchild-survived"
    child = f"import subprocess, time; subprocess.Popen(['sh', '-c', 'sleep 4; touch {marker}']); time.sleep(60)"
    (tmp_path / "log.txt").write_text("")
    result = gpu_check.run([sys.executable, "-c", child], tmp_path, "tests", time.monotonic() + 600)
    assert result["exit"] is None and result["seconds"] < 10
    assert "cut off after 2 s" in (tmp_path / "log.txt").read_text()
    time.sleep(4)
    assert not marker.exists()


def test_the_harness_and_its_benchmark_start_as_make_gpu_check_runs_them(tmp_path):
    # The harness as a script from anywhere (the checkout is not on sys.path then), the
    # benchmark as the harness's bench phase starts it.
    harness = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert harness.returncode == 0 and "--out" in harness.stdout, harness.stderr
    bench = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--help"], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "--out" in bench.stdout, bench.stderr


def test_phases_keep_the_later_phases_time_and_the_check_its_limit():
    now, deadline = 1000.0, 1000.0 + gpu_check.TOTAL_S
    later = sum(gpu_check.RESERVED_S[p] for p in gpu_check.PHASES[1:])
    assert gpu_check.phase_limit("build", now, deadline) == min(gpu_check.LIMITS_S["build"], gpu_check.TOTAL_S - later)
    # A build that ran long leaves the sanitizer its reserved time.
    assert gpu_check.phase_limit("tests", deadline - 200, deadline) == 200 - 80 - 80
    assert gpu_check.phase_limit("sanitizer", deadline - 80, deadline) == 80
    assert gpu_check.phase_limit("bench", deadline, deadline) == 1


def test_phases_see_the_checkout_ahead_of_pythonpath():
    env = gpu_check.child_env({"PYTHONPATH": "/carried/wheels", "PATH": "/bin"}, FORCE_CUDA="1")
    assert env["PYTHONPATH"] == f"{gpu_check.ROOT}{os.pathsep}/carried/wheels"
    assert env["FORCE_CUDA"] == "1" and env["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert gpu_check.child_env({})["PYTHONPATH"] == str(gpu_check.ROOT)


def test_undecodable_output_is_kept(tmp_path):
    (tmp_path / "log.txt").write_text("")
    result = gpu_check.run([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'bad \\xff byte')"],
                           tmp_path, "load", time.monotonic() + 60)
    assert result["exit"] == 0 and "bad \ufffd byte" in (tmp_path / "log.txt").read_text()


def test_the_load_check_fails_without_a_built_cuda_library():
    # This machine has no built CUDA library: the phase must say so, not pass.
    result = subprocess.run([sys.executable, "-c", gpu_check.LOAD_CHECK], cwd=ROOT, env=gpu_check.child_env(),
                            capture_output=True, text=True, timeout=120)
    if result.returncode == 0:
        assert "loaded" in result.stdout  # a machine with a GPU and a build
    else:
        assert "AssertionError" in result.stderr or "Error" in result.stderr


def test_the_benchmark_sets_run_and_tabulate_on_the_cpu(monkeypatch):
    # Every update set's options and the Hessian iteration, on the CPU and tiny: what
    # bench_gpu would build on the GPU does not fail there on a typo.
    from benchmarks import bench_gpu, common

    shapes = [(4, 3, 3, 3), (4,), (5, 4)]
    for _, options in bench_gpu.update_sets().values():
        for make in common.UPDATE_IMPLS.values():
            make(shapes, torch.device("cpu"), **options)()
    monkeypatch.setattr(bench_gpu, "HESSIAN_BATCH", 2)
    for fn, numel in bench_gpu.hessian_iterations(torch.device("cpu")).values():
        fn()
        assert numel > 1e6
    assert common.gb_per_s("adahessian fused", 10**6, 1.0) == 32 and common.gb_per_s("adam fused", 10**6, 1.0) == 28
    assert common.gb_per_s("adahessian fused", 10**6, 1.0, torch.bfloat16) == 26
    row = dict(set="s", impl="adahessian fused", median_ms=1.0, gbs=None, fraction_of_copy_bandwidth=None,
               fused_speedup=1.0, kernels_per_step=3)
    table = bench_gpu.markdown(dict(device="GPU", torch="2", cuda="13", commit="abc", date="d", copy_gbs=1.0, rows=[row]))
    assert "| s | adahessian fused | 1.000 |  |  | 1.00x | 3 |" in table
