"""The fused CUDA kernels (SPEC section 5), with TF32 off: bit-identical z across CPU and
CUDA, the functional core against the reference path per step from identical state,
training runs on real models, GradScaler, non-contiguous parameters, opcheck. The
cases and models are test_fused.py's, moved to the GPU. Skipped without a GPU."""

import copy

import pytest
import torch

import test_fused as cpu_cases
from adahessian import AdaHessian, backends, functional, sampler

CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _exact_matmul():
    allow = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allow


def cuda(x):
    """x with every tensor moved to the GPU (layouts kept), recursively."""
    if torch.is_tensor(x):
        return x.to(CUDA)
    if isinstance(x, (list, tuple)):
        return type(x)(cuda(v) for v in x)
    if isinstance(x, dict):
        return {k: cuda(v) for k, v in x.items()}
    return x


def test_fused_backend_is_available_on_cuda():
    assert backends.fused_unavailable_reason(CUDA) is None


@pytest.mark.parametrize("dtype", cpu_cases.ALL_DTYPES)
def test_rademacher_is_bit_identical_across_cpu_and_cuda(dtype):
    keys = [sampler.rademacher_key(2147483647, i, 9) for i in range(len(cpu_cases.SIZES))]
    like = [torch.empty(n, dtype=dtype, device=CUDA) for n in cpu_cases.SIZES]
    like.append(torch.empty(6, 5, 3, 3, dtype=dtype, device=CUDA).to(memory_format=torch.channels_last))
    keys.append(77)
    got = functional.sample_rademacher(like, keys, backend="fused")
    for t, k in zip(got, keys):
        assert torch.equal(t.cpu(), sampler.rademacher(t.shape, k, dtype=dtype))
        assert torch.equal(t, sampler.rademacher(t.shape, k, dtype=dtype, device=CUDA))


@pytest.mark.parametrize("dtype", cpu_cases.ALL_DTYPES)
def test_accumulate_is_bit_identical_to_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    shapes, keys = [(3, 40), (65536 + 5,), (2, 3, 5, 5)], [101, 202, 303]
    hzs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    acc = [torch.randn(s, generator=g, dtype=functional.state_dtype(hzs[0])) for s in shapes]
    zs = [sampler.rademacher(s, k, dtype=dtype) for s, k in zip(shapes, keys)]
    want = [a.clone() for a in acc]
    functional.accumulate_hessian_(want, zs, hzs, backend="reference")
    got = cuda(acc)
    functional.accumulate_hessian_(got, cuda(zs), cuda(hzs), keys=keys, backend="fused")
    assert all(torch.equal(a.cpu(), w) for a, w in zip(got, want))


@pytest.mark.parametrize("dtype", cpu_cases.ALL_DTYPES)
@pytest.mark.parametrize("case", list(cpu_cases.CORE_CASES))
@pytest.mark.parametrize("hessian_power", [1.0, 0.5, 0.7])
@pytest.mark.parametrize("average_conv_kernel", [False, True])
def test_functional_step_matches_the_cpu_reference(dtype, case, hessian_power, average_conv_kernel):
    lists, estimate = cpu_cases._problem(dtype, channels_last=average_conv_kernel, **cpu_cases.CORE_CASES[case])
    options = dict(
        n_samples=cpu_cases.CORE_CASES[case]["n_samples"], lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
        weight_decay=0.1, hessian_power=hessian_power, average_conv_kernel=average_conv_kernel,
        grad_scale=torch.tensor([2.0**10]) if hessian_power == 0.7 else None, found_inf=torch.tensor([0.0]),
    )
    want = cpu_cases._run_functional("reference", lists, estimate, **options)
    got = cpu_cases._run_functional("fused", cuda(lists), cuda(estimate), **cuda(options))
    for name in ("params", "exp_avgs", "exp_hessian_diag_sqs", "hessians"):
        low = name == "params" and dtype in cpu_cases.LOW_PRECISION
        tol = dict(rtol=1e-2, atol=1e-2) if low else dict(rtol=2e-6, atol=1e-7)
        for i, (g, w) in enumerate(zip(got[name], want[name])):
            if w is None:
                assert g is None
                continue
            assert g.is_cuda and g.stride() == w.stride()
            torch.testing.assert_close(g.cpu(), w, **tol, msg=lambda m: f"{name}[{i}] {tuple(w.shape)}: {m}")


def test_found_inf_leaves_every_tensor_untouched():
    lists, estimate = cpu_cases._problem(torch.float32, hessian_step=True, kept=True, n_samples=2, channels_last=True)
    lists, estimate = cuda(lists), cuda(estimate)
    options = dict(
        n_samples=2, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, hessian_power=1.0,
        average_conv_kernel=True, grad_scale=torch.tensor([8.0], device=CUDA),
        found_inf=torch.tensor([1.0], device=CUDA),
    )
    got = cpu_cases._run_functional("fused", lists, estimate, **options)
    for name, tensors in lists.items():
        if name != "state_steps":
            assert all(torch.equal(g, w) for g, w in zip(got[name], tensors))


@pytest.mark.parametrize("case", list(cpu_cases.OPCHECK_CASES))
def test_opcheck(case):
    op = getattr(torch.ops.adahessian, case.split("/")[0]).default
    torch.library.opcheck(op, cuda(cpu_cases.OPCHECK_CASES[case]()))


def _train(model, opt, batches, scaler):
    for batch in batches:
        cpu_cases._step(model, opt, cuda(batch), scaler)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(cpu_cases.TRAJECTORIES))
def test_training_trajectory_matches_the_reference_on_cuda(name, dtype):
    case = cpu_cases.TRAJECTORIES[name]
    cls, options, groups = case["cls"], case["options"], case.get("groups", False)
    torch.manual_seed(0)
    ref_model = cls().to(CUDA, dtype)
    if case.get("channels_last"):
        ref_model = ref_model.to(memory_format=torch.channels_last)
    fused_model = copy.deepcopy(ref_model)
    ref_opt = cpu_cases._optimizer(ref_model, "reference", options, groups)
    fused_opt = cpu_cases._optimizer(fused_model, "fused", options, groups)
    g = torch.Generator().manual_seed(1)
    batches = [cls.batch(g) for _ in range(24)]
    for model, opt in ((ref_model, ref_opt), (fused_model, fused_opt)):
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if case.get("scaled") else None
        _train(model, opt, batches, scaler)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    cpu_cases._compare_models(fused_model, ref_model, skip=getattr(cls, "ZERO_GRAD", ()), **tol)


@pytest.mark.parametrize("cls", [cpu_cases.MLP, cpu_cases.CNN, cpu_cases.Transformer])
@pytest.mark.parametrize("dtype", [torch.float32, *cpu_cases.LOW_PRECISION])
def test_steps_from_identical_state_match_the_reference(cls, dtype):
    low = dtype in cpu_cases.LOW_PRECISION
    options = dict(lr=0.01, eps=1e-3 if low else 1e-8, update_each=2, weight_decay=0.01,
                   average_conv_kernel=cls is cpu_cases.CNN)
    tol = dict(rtol=1e-2, atol=1e-2) if low else dict(rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    ref_model = cls().to(CUDA, dtype)
    ref_opt = AdaHessian(ref_model.parameters(), backend="reference", **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        batch = cuda(cls.batch(g))
        fused_model = copy.deepcopy(ref_model)
        fused_opt = AdaHessian(fused_model.parameters(), backend="fused", **options)
        fused_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        cpu_cases._step(ref_model, ref_opt, batch)
        cpu_cases._step(fused_model, fused_opt, batch)
        cpu_cases._compare_models(fused_model, ref_model, **tol)
