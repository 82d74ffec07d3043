"""The pinned Rademacher sampler (docs/algorithm.md, section 2) against a plain-Python-int copy of
the formula, plus its statistical properties."""

import pytest
import torch

from adahessian import AdaHessian, sampler
from cases import ALL_DTYPES

M = 0xFFFFFFFF


def py_fmix32(x):
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M
    x ^= x >> 16
    return x


def py_z(seed, param_index, counter, i):
    key = py_fmix32(py_fmix32(py_fmix32(seed ^ 0x9E3779B9) ^ param_index) ^ (counter & M))
    base = py_fmix32(key ^ (i >> 32))
    h = py_fmix32(((i & M) * 0x9E3779B9 + base) & M)
    return 1 if h & 1 == 0 else -1


@pytest.mark.parametrize("seed,index,counter", [(0, 0, 0), (2147483647, 3, 17), (2**32 - 1, 1000, 2**32 + 5)])
def test_bit_equal_to_plain_python_formula(seed, index, counter):
    key = sampler.rademacher_key(seed, index, counter)
    z = sampler.rademacher((3, 77), key, dtype=torch.float64)
    want = torch.tensor([py_z(seed, index, counter, i) for i in range(3 * 77)], dtype=torch.float64).view(3, 77)
    assert torch.equal(z, want)


def test_bit_equal_beyond_2_to_the_32_elements():
    key = sampler.rademacher_key(7, 2, 9)
    start = 2**32 - 40
    got = sampler.rademacher_signs(key, start, 80)
    want = torch.tensor([py_z(7, 2, 9, i) for i in range(start, start + 80)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_values_are_plus_minus_one_in_every_dtype(dtype):
    z = sampler.rademacher((1000,), sampler.rademacher_key(1, 2, 3), dtype=dtype)
    assert z.dtype == dtype
    assert set(z.unique().tolist()) == {-1.0, 1.0}


def _signs(seed, index, counter, n=200_000):
    return sampler.rademacher((n,), sampler.rademacher_key(seed, index, counter), dtype=torch.float64)


def test_balanced_and_uncorrelated():
    n = 200_000
    bound = 5 / n**0.5  # five standard deviations of a mean of n independent signs
    z = _signs(2147483647, 0, 0, n)
    assert abs(z.mean()) < bound
    for lag in (1, 2, 3, 8, 64, 1024):
        assert abs((z[:-lag] * z[lag:]).mean()) < bound, f"lag {lag}"
    others = {
        "next parameter": _signs(2147483647, 1, 0, n),
        "next sample": _signs(2147483647, 0, 1, n),
        "next seed": _signs(2147483646, 0, 0, n),
        "far counter": _signs(2147483647, 0, 2**31, n),
    }
    for what, w in others.items():
        assert abs((z * w).mean()) < bound, what
        assert not torch.equal(z, w), what


def test_no_bias_across_many_keys_at_each_index():
    # Element i of many different vectors is a fair coin too (no index is stuck).
    zs = torch.stack([_signs(5, p, c, 64) for p in range(40) for c in range(50)])
    assert zs.mean(dim=0).abs().max() < 5 / zs.shape[0] ** 0.5


def test_optimizer_draws_the_pinned_vectors():
    # A quadratic with H = I: Hz = z, so D = z * z = 1, but the HVP request carries z itself;
    # check that z given to autograd is the pinned one via a hook on the gradient graph.
    w = torch.nn.Parameter(torch.zeros(6, 5))
    seen = []
    opt = AdaHessian([torch.nn.Parameter(torch.zeros(3)), w], seed=123, n_samples=2, backend="reference")
    for _ in range(2):
        opt.zero_grad()
        loss = (w**2).sum() / 2
        loss.backward(create_graph=True)
        w.grad.register_hook(lambda g: seen.append(g.clone()))
        opt.step()
    counters = [0, 1, 2, 3]
    want = [torch.tensor([py_z(123, 1, c, i) for i in range(30)], dtype=torch.float32).view(6, 5) for c in counters]
    assert len(seen) == 4
    for got, exp in zip(seen, want):
        assert torch.equal(got, exp)
