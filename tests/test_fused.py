"""The fused CPU kernels against the reference path (SPEC section 5): bit-identical z,
the functional core option by option, and whole training runs on real models."""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from adahessian import AdaHessian, backends, functional, math_attention, sampler
from training import backward_and_step

CPU = torch.device("cpu")
REASON = backends.fused_unavailable_reason(CPU)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"fused kernels unavailable: {REASON}")

LOW_PRECISION = [torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float32, torch.float64, *LOW_PRECISION]


def ops():
    return torch.ops.adahessian


# ------------------------------------------------------------------ the sampler


# Sizes around the vector widths (8/16 float lanes) and the kernels' tile (512) and
# work-item (65536) lengths.
SIZES = [0, 1, 7, 15, 16, 17, 33, 511, 513, 1031, 65536 + 123]


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
def test_accumulate_is_bit_identical_to_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 40), (1031,), (2, 3, 5, 5)]
    keys = [101, 202, 303]
    hzs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    hzs[0] = hzs[0].t().contiguous().t()  # non-contiguous Hz
    acc = [torch.randn(s, generator=g, dtype=functional.state_dtype(hzs[0])) for s in shapes]
    expected = [a.clone() for a in acc]
    zs = [sampler.rademacher(s, k, dtype=dtype) for s, k in zip(shapes, keys)]
    functional.accumulate_hessian_(expected, zs, hzs, backend="reference")
    functional.accumulate_hessian_(acc, zs, hzs, keys=keys, backend="fused")
    assert all(torch.equal(a, e) for a, e in zip(acc, expected))


# --------------------------------------------------------- the functional core


SHAPES = [
    (37,),
    (3, 700),  # longer than a tile
    (65536 + 77,),  # more than one work item
    (4, 3, 3, 3),  # conv kernels: averaged over 9 elements
    (5, 2, 1, 1),  # 1x1 kernels: averaging takes |D|
    (2, 1, 30, 30),  # a kernel larger than a tile
]


def _problem(dtype, *, hessian_step, kept, n_samples, channels_last, seed=0):
    """Random lists for functional.adahessian: params, grads, state, Hz, keys."""
    g = torch.Generator().manual_seed(seed)
    sdtype = torch.float32 if dtype in LOW_PRECISION else dtype

    def rand(shape, dt, positive=False):
        t = (torch.rand if positive else torch.randn)(shape, generator=g, dtype=torch.float64).to(dt)
        return t.to(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    lists = dict(
        params=[rand(s, dtype) for s in SHAPES],
        grads=[rand(s, dtype) for s in SHAPES],
        exp_avgs=[rand(s, sdtype) for s in SHAPES],
        exp_hessian_diag_sqs=[rand(s, sdtype, positive=True) for s in SHAPES],
        hessians=[rand(s, sdtype) if kept else None for s in SHAPES],
        state_steps=[3 + i for i in range(len(SHAPES))],
    )
    keys = [sampler.rademacher_key(7, i, 40) for i in range(len(SHAPES))]
    estimate = dict(hzs=None, zs=None, keys=None, partial_sums=None)
    if hessian_step:
        estimate = dict(
            hzs=[rand(s, dtype) for s in SHAPES],
            zs=[sampler.rademacher(s, k, dtype=dtype) for s, k in zip(SHAPES, keys)],
            keys=keys,
            partial_sums=[rand(s, sdtype) for s in SHAPES] if n_samples > 1 else None,
        )
    return lists, estimate


def _run_functional(backend, lists, estimate, **options):
    lists = copy.deepcopy(lists)
    functional.adahessian(*lists.values(), **estimate, **options, backend=backend)
    return lists


CORE_CASES = {
    "hessian step, D not kept": dict(hessian_step=True, kept=False, n_samples=1),
    "hessian step, D kept, 3 samples": dict(hessian_step=True, kept=True, n_samples=3),
    "step with the kept D": dict(hessian_step=False, kept=True, n_samples=1),
}


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", list(CORE_CASES))
@pytest.mark.parametrize("hessian_power", [1.0, 0.5, 0.7, 0.0])
@pytest.mark.parametrize("average_conv_kernel", [False, True])
def test_functional_step_matches_the_reference(dtype, case, hessian_power, average_conv_kernel):
    channels_last = average_conv_kernel  # both layouts, without doubling the cases
    lists, estimate = _problem(dtype, channels_last=channels_last, **CORE_CASES[case])
    options = dict(
        n_samples=CORE_CASES[case]["n_samples"], lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
        hessian_power=hessian_power, average_conv_kernel=average_conv_kernel,
        grad_scale=torch.tensor([2.0**10]) if hessian_power == 0.7 else None, found_inf=torch.tensor([0.0]),
    )
    want = _run_functional("reference", lists, estimate, **options)
    got = _run_functional("fused", lists, estimate, **options)
    for name in ("params", "exp_avgs", "exp_hessian_diag_sqs", "hessians"):
        # The state is float32 or float64 on every dtype; a low-precision parameter is
        # rounded once, where the two paths may land one unit in the last place apart.
        low = name == "params" and dtype in LOW_PRECISION
        tol = dict(rtol=1e-2, atol=1e-2) if low else dict(rtol=2e-6, atol=1e-7)
        for i, (g, w) in enumerate(zip(got[name], want[name])):
            if w is None:
                assert g is None
                continue
            assert g.stride() == w.stride()
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}[{i}] {tuple(w.shape)}: {m}")


def test_found_inf_leaves_every_tensor_untouched():
    lists, estimate = _problem(torch.float32, hessian_step=True, kept=True, n_samples=2, channels_last=True)
    options = dict(
        n_samples=2, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, hessian_power=1.0,
        average_conv_kernel=True, grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]),
    )
    got = _run_functional("fused", lists, estimate, **options)
    for name, tensors in lists.items():
        if name != "state_steps":
            assert all(torch.equal(g, w) for g, w in zip(got[name], tensors))


def test_mixed_kept_and_absent_hessians_split():
    lists, estimate = _problem(torch.float32, hessian_step=True, kept=True, n_samples=1, channels_last=False)
    lists["hessians"][1] = lists["hessians"][4] = None  # state restored from a run without update_each
    options = dict(
        n_samples=1, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, hessian_power=1.0,
        average_conv_kernel=True, grad_scale=None, found_inf=None,
    )
    want = _run_functional("reference", lists, estimate, **options)
    got = _run_functional("fused", lists, estimate, **options)
    for name in ("params", "hessians"):
        for g, w in zip(got[name], want[name]):
            assert (g is None) == (w is None)
            if w is not None:
                torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------- operator checks


def _op_args(hessian_step):
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (2, 3, 3, 3)]
    rand = lambda s: torch.randn(s, generator=g)  # noqa: E731
    return (
        [rand(s) for s in shapes], [rand(s) for s in shapes], [rand(s) for s in shapes],
        [rand(s).abs() for s in shapes], [rand(s) for s in shapes],
        [rand(s) for s in shapes] if hessian_step else [], [], [1, 2] if hessian_step else [], [4, 4],
        0.01, 0.9, 0.999, 1e-8, 0.01, 1.0, 1, True, torch.tensor([4.0]), torch.tensor([0.0]),
    )


OPCHECK_CASES = {
    "rademacher_": lambda: ([torch.empty(5, 3), torch.empty(7, dtype=torch.float64)], [3, 4]),
    "accumulate_hessian_": lambda: ([torch.zeros(5, 3), torch.zeros(4)], [torch.randn(5, 3), torch.randn(4)], [1, 2]),
    "fused_step_/hessian": lambda: _op_args(True),
    "fused_step_/kept": lambda: _op_args(False),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op = getattr(ops(), case.split("/")[0]).default
    torch.library.opcheck(op, OPCHECK_CASES[case]())


# ------------------------------------------------------------ training runs


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    @staticmethod
    def batch(g):
        return torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)


class CNN(nn.Module):
    # conv1.bias sits right before BatchNorm: its exact gradient is zero.
    ZERO_GRAD = ("conv1.bias",)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.proj = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.tanh(self.bn(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        return self.head(self.proj(x).mean(dim=(2, 3)))

    @staticmethod
    def batch(g):
        return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)


class Transformer(nn.Module):
    # The key bias adds one constant to each softmax row: its exact gradient is zero.
    ZERO_GRAD = ("attn.in_proj_bias",)

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.ff = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(h + self.ff(h))
        return self.head(h.mean(dim=1))

    @staticmethod
    def batch(g):
        return torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4,), generator=g)


def _loss(model, batch):
    x, y = batch
    with math_attention():
        return nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)


def _optimizer(model, backend, options, groups):
    if groups:  # several param groups, each with its own hyperparameters
        params = list(model.parameters())
        half = len(params) // 2
        spec = [dict(params=params[:half], lr=0.02, hessian_power=0.5), dict(params=params[half:], weight_decay=0.02)]
    else:
        spec = model.parameters()
    return AdaHessian(spec, backend=backend, **options)


def _step(model, opt, batch, scaler=None):
    opt.zero_grad()
    backward_and_step(_loss(model, batch), opt, scaler)


def _compare_models(got, want, skip=(), **tol):
    for (name, p), q in zip(want.named_parameters(), got.parameters()):
        if name not in skip:
            torch.testing.assert_close(q, p, **tol, msg=lambda m: f"{name}: {m}")


# model, optimizer options; groups: two param groups with their own hyperparameters;
# scaled: under GradScaler; channels_last: conv weights (and so their state) channels-last.
TRAJECTORIES = {
    "mlp": dict(cls=MLP, options=dict(lr=0.05, weight_decay=0.01)),
    "mlp-power-0.7-groups": dict(cls=MLP, options=dict(lr=0.05, hessian_power=0.7, update_each=3), groups=True),
    "mlp-n_samples": dict(cls=MLP, options=dict(lr=0.05, n_samples=3, update_each=2)),
    "mlp-grad-scaler": dict(cls=MLP, options=dict(lr=0.05, update_each=2, n_samples=2), scaled=True),
    "cnn-avg-channels-last": dict(
        cls=CNN, options=dict(lr=0.02, average_conv_kernel=True, update_each=2, weight_decay=0.01), channels_last=True
    ),
    "cnn-power-0.5": dict(cls=CNN, options=dict(lr=0.02, hessian_power=0.5, average_conv_kernel=True), groups=True),
    "transformer": dict(cls=Transformer, options=dict(lr=0.01, update_each=2, weight_decay=0.01)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(TRAJECTORIES))
def test_training_trajectory_matches_the_reference(name, dtype):
    case = TRAJECTORIES[name]
    cls, options, groups = case["cls"], case["options"], case.get("groups", False)
    torch.manual_seed(0)
    ref_model = cls().to(dtype)
    if case.get("channels_last"):
        ref_model = ref_model.to(memory_format=torch.channels_last)
    fused_model = copy.deepcopy(ref_model)
    ref_opt = _optimizer(ref_model, "reference", options, groups)
    fused_opt = _optimizer(fused_model, "fused", options, groups)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) if case.get("scaled") else None for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    for _ in range(24):
        batch = cls.batch(g)
        _step(ref_model, ref_opt, batch, scalers[0])
        _step(fused_model, fused_opt, batch, scalers[1])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    _compare_models(fused_model, ref_model, skip=getattr(cls, "ZERO_GRAD", ()), **tol)
    if case.get("channels_last"):
        assert fused_model.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def _per_step(cls, dtype, options, steps, tol):
    """Each step from identical state: the fused optimizer starts from a copy of the
    reference model and optimizer state, takes the same step, and must land close."""
    torch.manual_seed(0)
    ref_model = cls().to(dtype)
    ref_opt = AdaHessian(ref_model.parameters(), backend="reference", **options)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = cls.batch(g)
        fused_model = copy.deepcopy(ref_model)
        fused_opt = AdaHessian(fused_model.parameters(), backend="fused", **options)
        fused_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        _step(ref_model, ref_opt, batch)
        _step(fused_model, fused_opt, batch)
        _compare_models(fused_model, ref_model, **tol)
        for p, q in zip(ref_model.parameters(), fused_model.parameters()):
            for key, value in ref_opt.state[p].items():
                if torch.is_tensor(value):
                    torch.testing.assert_close(fused_opt.state[q][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_steps_match_the_reference(dtype):
    # One rounding of p per step: the two paths may differ by one unit in the last place.
    # eps=1e-3 bounds the steps of elements whose D is near zero, which overflow float16.
    options = dict(lr=0.01, eps=1e-3, update_each=2, weight_decay=0.01)
    _per_step(MLP, dtype, options, steps=6, tol=dict(rtol=1e-2, atol=1e-2))


@pytest.mark.parametrize("cls", [CNN, Transformer])
def test_zero_gradient_parameters_match_per_step(cls):
    # m / sqrt(v) amplifies round-off on these parameters over a run (SPEC section 5).
    _per_step(cls, torch.float32, dict(lr=0.02, update_each=2), steps=6, tol=dict(rtol=1e-4, atol=1e-5))


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
