import pytest
import torch
import torch.distributed as dist

from adahessian import backends


def _fused_param():
    reason = backends.fused_unavailable_reason(torch.device("cpu"))
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param("fused", marks=marks)


# Every behavioural test runs on each backend; "fused" is skipped (saying why) where the
# compiled kernels are not available.
BACKENDS = ["reference", _fused_param()]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def one_rank_group(tmp_path):
    """torch.distributed initialised in this process: one gloo rank (a file store)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield "world"
    dist.destroy_process_group()
