import pytest
import torch
import torch.distributed as dist

from adahessian import backends


@pytest.fixture(scope="session")
def fused_kernels():
    """The compiled CPU kernels, loaded (JIT-built on first use where they were not
    built): tests that run them request this, so collecting the tests builds nothing.
    Skips, saying why, where they are unavailable; asked once per session."""
    reason = backends.fused_unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"fused kernels unavailable: {reason}")


# Every behavioural test runs on each backend.
@pytest.fixture(params=["reference", "fused"])
def backend(request):
    if request.param == "fused":
        request.getfixturevalue("fused_kernels")
    return request.param


@pytest.fixture
def one_rank_group(tmp_path):
    """torch.distributed initialised in this process: one gloo rank (a file store)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield "world"
    dist.destroy_process_group()
