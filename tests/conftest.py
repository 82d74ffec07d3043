import pytest
import torch

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
