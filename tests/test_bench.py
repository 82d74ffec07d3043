"""The benchmarks: a smoke run end to end, the foreach AdaHessian against the reference
path, and how the distributed benchmark times the all-reduce."""

import copy
import json

import pytest
import torch

import tolerances
from adahessian import AdaHessian, backends, sampler
from benchmarks import bench, bench_distributed, bench_layouts, common

pytestmark = pytest.mark.tooling


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_json_csv_png(tmp_path, restore_threads):
    # One thread: on a busy 2-core machine, two OpenMP threads wait on each other for
    # a scheduler slice per parallel region, and a seconds-long run takes minutes.
    returned = bench.main(["--quick", "--quiet", "--threads", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["rows"] == returned["rows"]
    assert result["torch"] == torch.__version__ and result["rounds"] == 2

    impls = {"adam", "adahessian-reference", "adahessian-foreach"}
    package = "adahessian-reference"  # the implementation the modes (sub4, accum4, fd, ...) run on
    if backends.fused_unavailable_reason(torch.device("cpu")) is None:
        impls.add("adahessian-fused")
        package = "adahessian-fused"
    classic = bench.MEASUREMENTS[: -len(bench.MODES)]
    modes = [f"iteration-{m}" for m in bench.MODES]
    expected = {
        (w, m, i)
        for w, measurements in [("cnn", classic), ("transformer", classic), ("many-small", ("update", "step"))]
        for m in measurements
        for i in impls
        if not (i == "adam" and m == "iteration-ue10")
    } | {(w, m, package) for w in ("cnn", "transformer") for m in modes}
    assert expected <= {(r["workload"], r["measurement"], r["impl"]) for r in result["rows"]}
    assert {r["impl"] for r in result["rows"] if r["measurement"] in modes} == {package}
    for r in result["rows"]:
        assert 0 < r["p25_ms"] <= r["median_ms"] <= r["p75_ms"], r
        assert r["vs_adam"] > 0 and r["vs_reference"] > 0, r
        if r["measurement"].startswith("iteration"):
            assert r["peak_mib"] >= 0 and r["state_mib"] > 0, r
            assert abs(r["growth_mib"]) < 64, r  # a leaked double-backward graph would show here
    reference_rows = [r for r in result["rows"] if r["impl"] == "adahessian-reference"]
    assert all(r["vs_reference"] == 1 for r in reference_rows)

    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("workload,measurement,impl,median_ms") and len(csv_lines) == len(result["rows"]) + 1
    assert "| cnn | iteration-ue10 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "options",
    [dict(), dict(weight_decay=0.1, hessian_power=0.5, average_conv_kernel=True)],
    ids=["defaults", "decay-power-conv"],
)
def test_foreach_matches_reference(monkeypatch, options):
    """A Hessian step and the step after it (update_each=2) update every parameter as
    AdaHessian(backend="reference") does, given the same Rademacher vectors: in float64,
    where the claim is exactness (the foreach ops round differently, e.g. lerp for m)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Tanh()
    ).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    reference = AdaHessian(model.parameters(), lr=0.05, update_each=2, backend="reference", **options)
    foreach = bench.ForeachAdaHessian(twin.parameters(), lr=0.05, update_each=2, **options)
    # The pinned sampler's vectors for the first Hessian step (counter 0), as AdaHessian draws them.
    monkeypatch.setattr(
        bench, "rademacher_like",
        lambda ps: [sampler.rademacher(p.shape, sampler.rademacher_key(reference.seed, i, 0), dtype=p.dtype)
                    for i, p in enumerate(ps)],
    )
    for step in range(2):
        assert reference.hessian_due == foreach.hessian_due == (step == 0)
        for m, opt in ((model, reference), (twin, foreach)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward(create_graph=opt.hessian_due)
            opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            tolerances.assert_trajectory_close(q, p, step + 1)


def test_update_only_sets_have_torchvisions_sizes():
    assert common.resnet18_shapes()[-2:] == [(1000, 512), (1000,)]  # each asserts its count and size
    assert common.resnet50_shapes()[-2:] == [(1000, 2048), (1000,)]


def test_distributed_bench_reads_the_all_reduce_of_each_step_from_the_distributor(one_rank_group):
    # The distributor's timing of its averaging, read after each step (one gloo rank, in
    # this process): a Hessian step and the step after it each all-reduce once.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = AdaHessian(model.parameters(), update_each=2, process_group=one_rank_group)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    times = [bench_distributed.iteration(model, opt, x, y) for _ in range(3)]
    comms = [comm for _, _, comm in times]
    assert len(comms) == 3
    assert all(0 < comm < step for _, step, comm in times), times


def test_layouts_run_replaces_its_section_only(tmp_path, fused_kernels):
    results = tmp_path / "RESULTS.md"
    other = "<!-- other: begin -->\nkept\n<!-- other: end -->"
    results.write_text(f"# Benchmark results\n\n{other}\n\n{bench_layouts.BEGIN}\nstale\n{bench_layouts.END}\n")
    section = bench_layouts.main(["--quick", "--rounds", "1", "--results", str(results)])
    text = results.read_text()
    assert other in text and "stale" not in text and text.count(bench_layouts.BEGIN) == 1 and section in text
    rows = [line for line in section.splitlines() if line.startswith("| ") and "ms |" not in line]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(bench_layouts.KINDS)
