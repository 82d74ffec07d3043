"""A DistributedDataParallel-wrapped model on the exact (double-backward) path: every
backward runs under ``ddp_model.no_sync()`` and AdaHessian's ``process_group`` averages
the gradients and the Hessian-vector products. Two gloo ranks on shards equal one process
on the whole batch, and stay bitwise equal; without ``no_sync`` DDP's reducer fails on
``create_graph=True``."""

import dist_worker

WORLD = 2


def test_ddp_wrapped_model_under_no_sync_equals_one_process(tmp_path, backend):
    codes, results = dist_worker.launch(tmp_path, WORLD, backend, "ddp_no_sync")
    assert codes == [0] * WORLD
    dist_worker.assert_ranks_equal_one_process(results, backend, WORLD)
    # Why no_sync is needed: DDP's reducer writes the averaged gradients in place into
    # gradients that carry a graph (torch 2.13 and 2.14 raise this).
    for result in results:
        assert "in-place operation" in result["without_no_sync"], result["without_no_sync"]
