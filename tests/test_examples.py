"""The examples run and learn: the digits demo at a reduced size, and the quickstart."""

import json
import runpy
import sys

import pytest
import torch

from examples import train_digits

pytestmark = pytest.mark.tooling


@pytest.fixture
def one_thread():
    # Tiny convolutions gain nothing from a second thread, and on a busy 2-core machine
    # two OpenMP threads wait on each other for a scheduler slice per parallel region.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_reduced_size_learns(tmp_path, one_thread):
    result = train_digits.main(["--epochs", "5", "--seeds", "1", "--out", str(tmp_path)])
    assert result["summary"]["adahessian"]["accuracy"] >= 0.90
    assert result["summary"]["adam"]["accuracy"] >= 0.90
    for run in result["runs"]:
        assert run["train_loss"][-1] < run["train_loss"][0] / 4
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == result["summary"]
    assert (tmp_path / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_digits_runs_every_variant(tmp_path, one_thread):
    argv = ["--epochs", "3", "--seeds", "1", "--hessian-fraction", "1", "0.25", "--hvp", "autograd",
            "finite_difference", "--out", str(tmp_path)]
    result = train_digits.main(argv)
    assert set(result["summary"]) == {"adahessian", "adahessian-sub0.25", "adahessian-finite_difference", "adam"}
    for run in result["runs"]:
        assert run["train_loss"][-1] < run["train_loss"][0] / 2, run["optimizer"]
        assert run["accuracy"] >= 0.85, run["optimizer"]


def test_quickstart_runs(capsys, monkeypatch, one_thread):
    monkeypatch.setattr(sys, "argv", ["quickstart.py"])
    runpy.run_module("examples.quickstart", run_name="__main__")
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(losses) == 7 and losses[-1] < losses[0] / 4
