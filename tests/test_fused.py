"""The fused CPU kernels against the reference path (docs/algorithm.md, sections 3-4):
bit-identical z, the functional core option by option, and training runs on real models
(float64 over a run, every dtype per step from identical state; tests/tolerances.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from adahessian import functional, sampler
from adahessian.functional import Difference
from cases import (ALL_DTYPES, CORE_CASES, CPU, dtype_name, INV_STEP, OPCHECK_CASES, PER_STEP, SIZES, STEPS, TRAJECTORIES,
                   IN_PLACE_CASES, assert_functional_close, core_options, in_place_step_matches, per_step_case, per_step_id, problem,
                   relayout, run_functional, steps_from_identical_state, trajectories_match)

# Every test here runs the compiled CPU kernels or checks how they load: skipped, saying
# why, where they are unavailable (found out when the first test runs, not at collection).
pytestmark = pytest.mark.usefixtures("fused_kernels")


def ops():
    return torch.ops.adahessian


# ------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rademacher_fill_is_bit_identical_to_the_sampler(dtype):
    keys = [sampler.rademacher_key(2147483647, i, 5) for i in range(len(SIZES))]
    out = [torch.empty(n, dtype=dtype) for n in SIZES]
    ops().rademacher_(out, keys)
    for t, k in zip(out, keys):
        assert torch.equal(t, sampler.rademacher(t.shape, k, dtype=dtype))
    fused = functional.sample_rademacher(out, keys, backend="fused")
    reference = functional.sample_rademacher(out, keys, backend="reference")
    assert all(torch.equal(f, r) for f, r in zip(fused, reference))


def test_rademacher_fill_uses_the_logical_index_of_non_contiguous_outputs():
    channels_last = torch.empty(6, 5, 3, 3).to(memory_format=torch.channels_last)
    transposed = torch.empty(7, 9).t()
    base = torch.zeros(4, 10)
    strided = base[:, ::2]
    ops().rademacher_([channels_last, transposed, strided], [11, 12, 13])
    for t, k in [(channels_last, 11), (transposed, 12), (strided, 13)]:
        assert torch.equal(t, sampler.rademacher(t.shape, k))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.all(base[:, 1::2] == 0)  # the view's gaps stay untouched


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("difference", [False, True], ids=["hz", "difference"])
def test_accumulate_is_bit_identical_to_the_reference(dtype, difference):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 40), (1031,), (2, 3, 5, 5)]
    keys = [101, 202, 303]
    hzs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    hzs[0] = hzs[0].t().contiguous().t()  # non-contiguous Hz
    # A finite difference: Hz = (hzs - bases) * INV_STEP, the bases a contiguous Hz's layout.
    bases = [torch.randn(s, generator=g).to(dtype) for s in shapes] if difference else None
    acc = [torch.randn(s, generator=g, dtype=functional.state_dtype(hzs[0])) for s in shapes]
    expected = [a.clone() for a in acc]
    zs = [sampler.rademacher(s, k, dtype=dtype) for s, k in zip(shapes, keys)]
    options = dict(hzs=None, difference=Difference(hzs, bases, INV_STEP)) if difference else dict(hzs=hzs)
    functional.accumulate_hessian_(expected, zs, **options, backend="reference")
    functional.accumulate_hessian_(acc, zs, keys=keys, **options, backend="fused")
    assert all(torch.equal(a, e) for a, e in zip(acc, expected))


# --------------------------------------------------------- the functional core


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", list(CORE_CASES))
@pytest.mark.parametrize("hessian_power", [1.0, 0.5, 0.7, 0.0])
@pytest.mark.parametrize("average_conv_kernel", [False, True])
def test_functional_step_matches_the_reference(dtype, case, hessian_power, average_conv_kernel):
    channels_last = average_conv_kernel  # both layouts, without doubling the cases
    lists, estimate = problem(dtype, channels_last=channels_last, **CORE_CASES[case])
    options = core_options(CORE_CASES[case]["n_samples"], hessian_power, average_conv_kernel)
    want = run_functional("reference", lists, estimate, **options)
    got = run_functional("fused", lists, estimate, **options)
    assert all(g.stride() == w.stride() for g, w in zip(got["params"], want["params"]))
    assert_functional_close(got, want, lists, options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("case", list(IN_PLACE_CASES))
def test_dense_non_contiguous_tensors_are_stepped_in_place(case, dtype):
    in_place_step_matches(CPU, ops(), case, dtype)


@pytest.mark.parametrize("case", ["no averaging", "conv kernels"])
def test_hz_in_another_layout_costs_one_copy_each(case):
    in_place_step_matches(CPU, ops(), case, torch.float32, hz_elsewhere=True)


def test_accumulate_and_rademacher_work_in_place_on_dense_layouts():
    shapes, keys = [(3, 40), (4, 5, 3, 3)], [101, 202]
    g = torch.Generator().manual_seed(0)
    hzs = [relayout(torch.randn(s, generator=g)) for s in shapes]
    bases = [relayout(torch.randn(s, generator=g)) for s in shapes]
    acc = [relayout(torch.randn(s, generator=g)) for s in shapes]
    want = [a.contiguous() for a in acc]
    ops().accumulate_hessian_(want, [h.contiguous() for h in hzs], [b.contiguous() for b in bases], keys, INV_STEP)
    out = [relayout(torch.empty(s)) for s in shapes]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops().accumulate_hessian_(acc, hzs, bases, keys, INV_STEP)
        ops().rademacher_(out, keys)
    assert not {e.name for e in prof.events()} & {"aten::copy_", "aten::clone", "aten::contiguous"}
    assert all(torch.equal(a, w) for a, w in zip(acc, want))
    assert all(torch.equal(o, sampler.rademacher(o.shape, k)) for o, k in zip(out, keys))


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_hessians_are_kept_for_all_parameters_or_none(backend):
    lists, estimate = problem(torch.float32, hessian_step=True, kept=True, n_samples=1, channels_last=False)
    lists["hessians"][1] = None
    options = dict(n_samples=1, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, hessian_power=1.0,
                   average_conv_kernel=True)
    with pytest.raises(ValueError, match="all tensors or all None"):
        run_functional(backend, lists, estimate, **options)


# --------------------------------------------------------------- operator checks


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op = getattr(ops(), case.split("/")[0]).default
    torch.library.opcheck(op, OPCHECK_CASES[case]())


# ------------------------------------------------------------ training runs


@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_training_trajectory_matches_the_reference(name):
    # Exactness over a whole run, in float64 (tests/tolerances.py); float32 is checked
    # per step below. Zero-gradient parameters have no bounded gain over a run.
    trajectories_match(TRAJECTORIES[name])


@pytest.mark.parametrize("name,dtype", PER_STEP, ids=[per_step_id(*c) for c in PER_STEP])
def test_steps_from_identical_state_match_the_reference(name, dtype):
    # Every parameter, the zero-gradient ones included (docs/algorithm.md, section 4), every dtype.
    steps_from_identical_state(per_step_case(name, dtype), dtype, STEPS)


# -------------------------------------------------------------------- loading


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_import_registers_built_kernels_and_builds_nothing():
    code = (
        "import sys, adahessian; from adahessian import _ops; "
        "print(_ops._has_kernels('CPU'), 'adahessian._C' in sys.modules, len(_ops._jit_errors))"
    )
    built = importlib.util.find_spec("adahessian._C") is not None
    result = _python(code, ADAHESSIAN_JIT="0")  # whatever this run's environment says
    assert result.stdout.split() == [str(built), str(built), "0"], result.stderr
    result = _python(code, ADAHESSIAN_JIT="1")
    assert result.stdout.split() == ["False", "False", "0"], result.stderr


def test_without_a_compiler_auto_falls_back_and_fused_raises(tmp_path):
    code = """
import warnings, torch, pytest
from adahessian import AdaHessian
p = torch.nn.Parameter(torch.ones(3))
with pytest.raises(RuntimeError, match="JIT build failed"):
    AdaHessian([p], backend="fused")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    opt = AdaHessian([p], backend="auto")
assert [w for w in caught if "using the reference path" in str(w.message)], [str(w.message) for w in caught]
(p * p).sum().backward(create_graph=True)
opt.step()
print("ok")
"""
    result = _python(code, ADAHESSIAN_JIT="1", CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
