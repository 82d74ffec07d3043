"""Data-parallel AdaHessian over gloo on loopback: N ranks on N shards equal one process
on the whole batch, ranks stay bitwise equal, and a failing rank does not hang the rest."""

import pytest
import torch

import dist_worker
from dist_worker import launch


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_on_shards_equal_one_process_on_the_whole_batch(tmp_path, world, backend):
    codes, results = launch(tmp_path, world, backend, "equivalence")
    assert codes == [0] * world
    dist_worker.assert_ranks_equal_one_process(results, backend, world)
    # Without a process group the ranks drift apart: each rank was warned once.
    assert [r["warned_without_group"] for r in results] == [1] * world


def test_a_ddp_wrapped_model_trains_with_finite_differences(tmp_path, backend):
    # README, "Without double backward": DDP averages the gradients of every evaluation.
    codes, results = launch(tmp_path, 2, backend, "ddp_finite_difference")
    assert codes == [0, 0]
    assert all(torch.equal(p, q) for p, q in zip(results[1], results[0]))
    oracle = dist_worker.train_ddp_finite_difference(backend, 2)
    for p, q in zip(results[0], oracle):
        # float64: the ranks' averaged gradients round differently from the whole batch's,
        # and the difference quotient divides that by eps (~1e-8 here).
        assert ((p - q).norm() / q.norm()).item() < 1e-5
    assert not torch.equal(results[0][0], dist_worker.make_model()[0].weight)


def test_ranks_with_different_seeds_are_refused(tmp_path):
    codes, results = launch(tmp_path, 2, "reference", "seed_mismatch")
    assert codes == [0, 0]
    for message in results:
        assert "disagree on seed" in message


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    codes, results = launch(tmp_path, 2, "reference", "rank_raises")
    assert codes[1] != 0  # the failing rank
    assert codes[0] != 0 and results[0] is None  # the other one gave up instead of hanging


def test_buckets_fill_up_to_the_element_limit_in_order(one_rank_group, monkeypatch):
    import torch.distributed as dist

    from adahessian import distributed

    monkeypatch.setattr(distributed, "BUCKET_ELEMENTS", 10)
    sizes = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: sizes.append((t.dtype, t.numel())) or real(t, **kw))
    tensors = [torch.full((n,), float(n)) for n in (4, 4, 4, 12, 1)] + [torch.ones(3, dtype=torch.float64)]
    before = [t.clone() for t in tensors]
    distributed.all_reduce_mean_(tensors, dist.group.WORLD)
    # float32: [4, 4] | [4] | [12] (alone: larger than the limit) | [1]; float64: [3].
    assert sizes == [(torch.float32, 8), (torch.float32, 4), (torch.float32, 12), (torch.float32, 1), (torch.float64, 3)]
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))  # the mean over one rank
