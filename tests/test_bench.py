"""Smoke test: the benchmark runs end to end and writes what it promises."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_bench_quick_writes_results(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--quiet", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    impls = {r["impl"] for r in result["rows"]}
    assert {"adam", "adahessian-reference", "adahessian-reference-ue10"} <= impls
    assert {r["workload"] for r in result["rows"]} == {"cnn", "transformer"}
    for r in result["rows"]:
        assert 0 < r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["vs_adam"] > 0
    assert result["torch"]
