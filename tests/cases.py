"""What the fused-kernel tests share (tests/test_fused.py on the CPU kernels,
tests/test_cuda.py on the CUDA ones): the dtypes and sizes, the functional-core problems,
the operator-check arguments, the models and their training cases, and the two
comparisons against the reference path (docs/algorithm.md, section 4; tests/tolerances.py)."""

import copy
import math

import torch
from torch import nn

import tolerances
from adahessian import AdaHessian, averaging, functional, math_attention, sampler
from adahessian.functional import Difference, Estimate
from tolerances import LOW_PRECISION
from training import backward_and_step

CPU = torch.device("cpu")
ALL_DTYPES = (torch.float32, torch.float64, *LOW_PRECISION)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Sizes around the vector widths (8/16 float lanes) and the kernels' tile (512) and
# work-item (65536) lengths.
SIZES = [0, 1, 7, 15, 16, 17, 33, 511, 513, 1031, 65536 + 123]


def to(device, x):
    """x with every tensor on ``device`` (layouts kept), recursively (lists, tuples, dicts, Estimate)."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (Estimate, Difference)):
        return type(x)(*(to(device, v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(to(device, v) for v in x)
    if isinstance(x, dict):
        return {k: to(device, v) for k, v in x.items()}
    return x


# --------------------------------------------------------- the functional core


SHAPES = [
    (37,),
    (3, 700),  # longer than a tile
    (65536 + 77,),  # more than one work item
    (4, 3, 3, 3),  # conv kernels: averaged over 9 elements
    (5, 2, 1, 1),  # 1x1 kernels: averaging takes |D|
    (2, 1, 30, 30),  # a kernel larger than a tile
]

# difference: Hz as a finite difference, the kernels reading its two gradients and 1 / eps.
CORE_CASES = {
    "hessian step, D not kept": dict(hessian_step=True, kept=False, n_samples=1),
    "hessian step, D kept, 3 samples": dict(hessian_step=True, kept=True, n_samples=3),
    "finite difference, D not kept": dict(hessian_step=True, kept=False, n_samples=1, difference=True),
    "finite difference, D kept, 2 samples": dict(hessian_step=True, kept=True, n_samples=2, difference=True),
    "step with the kept D": dict(hessian_step=False, kept=True, n_samples=1),
}
INV_STEP = 1 / 0.0123  # not a power of two: its rounding to the compute dtype counts


def problem(dtype, *, hessian_step, kept, n_samples, channels_last, difference=False, seed=0, shapes=None):
    """Random lists for functional.adahessian (params, grads, state) and, on a Hessian
    step, its Estimate (z, keys, Hz, partial sums; with ``difference``, Hz as the
    Difference of the gradients at two nearby points and INV_STEP)."""
    g = torch.Generator().manual_seed(seed)
    sdtype = tolerances.compute_dtype(dtype)
    SHAPES = shapes or globals()["SHAPES"]  # noqa: N806

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
    if not hessian_step:
        return lists, None
    hzs = [rand(s, dtype) for s in SHAPES]
    zs = [sampler.rademacher(s, k, dtype=dtype) for s, k in zip(SHAPES, keys)]
    partial_sums = [rand(s, sdtype) for s in SHAPES] if n_samples > 1 else None
    if not difference:
        return lists, Estimate(zs, keys, hzs, partial_sums)
    # The gradients eps apart differ by about eps * Hz: the difference cancels their leading digits.
    bases = [(h.double() - rand(s, torch.float64) / INV_STEP).to(dtype) for h, s in zip(hzs, SHAPES)]
    return lists, Estimate(zs, keys, None, partial_sums, Difference(hzs, bases, INV_STEP))


# Shapes for the spatial-averaging options: every dimension count up to 5, sizes that
# blocks of 1, 4 and 32 divide, groups longer than a tile and than a CUDA group tile.
AVERAGING_SHAPES = [(32,), (96, 8), (4, 3, 32), (2, 2, 4, 4), (8, 4, 1, 1), (2, 1, 32, 40), (2, 2, 2, 2, 4), (3, 1088)]
# The official rule refuses 5-D tensors.
OFFICIAL_SHAPES = [s for s in AVERAGING_SHAPES if len(s) < 5] + [(7,), (5, 3), (3, 2, 5), (5, 2, 1, 1), ()]
AVERAGING_OPTIONS = {
    "official": dict(spatial_averaging="official"),
    "official, average_conv_kernel": dict(spatial_averaging="official", average_conv_kernel=True),
    "block 1": dict(block_length=1),
    "block 4": dict(block_length=4),
    "block 32": dict(block_length=32),
}


def averaging_shapes(options):
    return OFFICIAL_SHAPES if options.get("spatial_averaging") == "official" else AVERAGING_SHAPES


def averaging_problem(dtype, case, core):
    """The functional core's problem for averaging option ``case`` (AVERAGING_OPTIONS) and
    core case ``core`` (CORE_CASES), channels-last: (lists, estimate, options)."""
    options = dict(core_options(CORE_CASES[core]["n_samples"], 0.5, False), **AVERAGING_OPTIONS[case])
    lists, estimate = problem(dtype, channels_last=True, shapes=averaging_shapes(options), **CORE_CASES[core])
    return lists, estimate, options


# The core cases the spatial-averaging comparisons run: a Hessian step and a kept-D step.
AVERAGING_CORES = ["hessian step, D kept, 3 samples", "step with the kept D"]


def averaging_step_matches(dtype, case, core, to=lambda x: x):
    """The fused step with averaging option ``case`` on core case ``core``
    (averaging_problem), its inputs moved by ``to`` (a CUDA target's device), against
    the reference path's on the CPU."""
    lists, estimate, options = averaging_problem(dtype, case, core)
    want = run_functional("reference", lists, estimate, **options)
    got = run_functional("fused", to(lists), to(estimate), **to(options))
    assert_functional_close(got, want, lists, options)


def core_options(n_samples, hessian_power, average_conv_kernel):
    """functional.adahessian's options for the core cases (weight decay on)."""
    return dict(
        n_samples=n_samples, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
        hessian_power=hessian_power, average_conv_kernel=average_conv_kernel,
    )


def run_functional(backend, lists, estimate, **options):
    """functional.adahessian on a copy of ``lists``; returns the copy, stepped."""
    lists = copy.deepcopy(lists)
    functional.adahessian(*lists.values(), estimate=estimate, **options, backend=backend)
    return lists


def relayout(t):
    """t with the same values in another memory order: 4-D channels-last, 2-D column-major."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.t().contiguous().t() if t.dim() == 2 else t


# Spatial averaging options and shapes the fused step processes in place (host.h,
# group_stride_of), channels-last and column-major: averaging groups that interleave in
# memory (a conv weight's kh*kw groups in_channels apart, a column-major matrix's rows or
# blocks). Blocks of interleaved groups (group * stride elements) up to the CPU's whole-
# block limit (16,384) and past it, past a work item (65,536; also 8,000 small blocks),
# with more groups side by side than a column tile (2,000 > 512) and fewer than a vector
# (3); groups longer than a summation segment (49, 700, 1,000).
IN_PLACE_CASES = {
    "no averaging": (dict(average_conv_kernel=False), SHAPES),
    "conv kernels": (dict(average_conv_kernel=True), [(4, 3, 3, 3), (1000, 8, 3, 3), (2, 600, 3, 3), (4, 6, 7, 7),
                                                       (2, 2000, 3, 3), (2, 8000, 3, 3), (5, 2, 1, 1), (3, 700)]),
    "official": (dict(spatial_averaging="official"),
                 [(3, 700), (20, 1000), (4, 6, 7, 7), (1000, 8, 3, 3), (5, 2, 1, 1)]),
    "block 4": (dict(block_length=4), [(3, 700), (2, 2, 4, 4), (6, 5, 3, 4)]),
}


def hz_layout(t):
    """t in the layout the double backward returns a channels-last conv weight's Hz in
    (strides (kh*kw, O*kh*kw, kw, 1): memory order I, O, kh, kw); 2-D row-major."""
    if t.dim() == 4:
        return t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    return t.contiguous()


def _same_layout(a, b):
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def in_place_step_matches(device, kernels, case, dtype, hz_elsewhere=False):
    """The fused step (kernels.fused_step_) on channels-last and column-major tensors
    (IN_PLACE_CASES[case]): processed in memory order, in place, with the result of the
    same step on contiguous tensors, bit for bit. The profiler sees no copy; with
    ``hz_elsewhere``, Hz and the bases come in hz_layout, and each that the parameter's
    layout differs from costs one copy_ into it, nothing more."""
    averaging, shapes = IN_PLACE_CASES[case]
    lists, estimate = problem(dtype, hessian_step=True, kept=True, n_samples=2, channels_last=False,
                              difference=True, shapes=shapes)
    names = ("params", "grads", "exp_avgs", "exp_hessian_diag_sqs", "hessians")
    contiguous = to(device, [lists[k] for k in names] + [estimate.difference.ahead, estimate.difference.behind, estimate.partial_sums])
    relaid = [[relayout(t) for t in ts] for ts in contiguous]
    if hz_elsewhere:
        relaid[5:7] = [[hz_layout(t) for t in ts] for ts in contiguous[5:7]]
    assert sum(not t.is_contiguous() for t in relaid[0]) >= 2
    moved = sum(not _same_layout(h, p) for hs in relaid[5:7] for h, p in zip(hs, relaid[0]))
    assert (moved >= 4) if hz_elsewhere else (moved == 0)
    pointers = [[t.data_ptr() for t in ts] for ts in relaid]
    options = dict(keys=estimate.keys, steps=lists["state_steps"], lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                   weight_decay=0.1, hessian_power=1.0, n_samples=2, inv_step=estimate.difference.inv_eps,
                   groups=kernel_groups(shapes, **averaging))
    before = [t.clone() for t in contiguous[0]]
    kernels.fused_step_(*contiguous, **options)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        kernels.fused_step_(*relaid, **options)
    names = [e.name for e in prof.events()]
    assert not {"aten::clone", "aten::contiguous"} & set(names)
    assert names.count("aten::copy_") == moved and names.count("aten::empty_like") == moved
    assert [[t.data_ptr() for t in ts] for ts in relaid] == pointers
    for got, want in zip(relaid, contiguous):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(g.stride() == relayout(w).stride() for g, w in zip(relaid[0], contiguous[0]))
    # The step moved the parameters: the comparison above is not between two untouched copies.
    assert not any(torch.equal(a, b) for a, b in zip(contiguous[0], before))


STATE = dict(params="param", exp_avgs="exp_avg", exp_hessian_diag_sqs="exp_hessian_diag_sq", hessians="hessian")
HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "hessian_power")


def kernel_groups(shapes, **averaging_options):
    """fused_step_'s groups for tensors of these shapes under these averaging settings
    (the optimizer's defaults for those not given): the group size of each tensor's
    averaging.rule_of, 0 where D stays per element."""
    settings = dict(dict(average_conv_kernel=False, spatial_averaging="conv2d", block_length=1), **averaging_options)
    rules = [averaging.rule_of(tuple(s), **settings) for s in shapes]
    return [0 if r is None else r.group for r in rules]


def averaging_group(t, options):
    """Elements whose |D| are averaged together (adahessian/averaging.py's rules, written
    out for the error model), else 1."""
    block = options.get("block_length", 1)
    if block > 1:
        return block
    if options.get("spatial_averaging", "conv2d") == "official":
        trailing = {4: 2, 3: 1, 2: 1}.get(t.dim(), 0)
        return max(1, math.prod(t.shape[t.dim() - trailing:]))
    return t.shape[2] * t.shape[3] if options["average_conv_kernel"] and t.dim() == 4 else 1


def assert_functional_close(got, want, before, options):
    """functional.adahessian's outputs ``got`` against the reference's ``want``, per
    tensor, within the error model of tests/tolerances.py (both from ``before``)."""
    for i, p in enumerate(before["params"]):
        tolerances.assert_step_close(
            {STATE[k]: got[k][i] for k in STATE}, {STATE[k]: want[k][i] for k in STATE},
            dict(param=p, exp_avg=before["exp_avgs"][i]), before["grads"][i],
            dict({k: options[k] for k in HYPER}, step=before["state_steps"][i]),
            dtypes=(p.dtype, p.dtype), group=averaging_group(p, options),
            what=f"[{i}] {tuple(p.shape)}",
        )


# --------------------------------------------------------------- operator checks


def _op_args(hessian_step, difference=False):
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (2, 3, 3, 3)]
    rand = lambda s: torch.randn(s, generator=g)  # noqa: E731
    return (
        [rand(s) for s in shapes], [rand(s) for s in shapes], [rand(s) for s in shapes],
        [rand(s).abs() for s in shapes], [rand(s) for s in shapes],
        [rand(s) for s in shapes] if hessian_step else [], [rand(s) for s in shapes] if difference else [], [],
        [1, 2] if hessian_step else [], [4, 4], 0.01, 0.9, 0.999, 1e-8, 0.01, 1.0, 1,
        INV_STEP if difference else 1.0, kernel_groups(shapes, average_conv_kernel=True),
    )


def _accumulate_args(difference):
    shapes = [(5, 3), (4,)]
    bases = [torch.randn(s) for s in shapes] if difference else []
    return ([torch.zeros(s) for s in shapes], [torch.randn(s) for s in shapes], bases, [1, 2],
            INV_STEP if difference else 1.0)


# Each op's arguments (CPU tensors), by "op" or "op/variant".
OPCHECK_CASES = {
    "rademacher_": lambda: ([torch.empty(5, 3), torch.empty(7, dtype=torch.float64)], [3, 4]),
    "accumulate_hessian_": lambda: _accumulate_args(False),
    "accumulate_hessian_/difference": lambda: _accumulate_args(True),
    "fused_step_/hessian": lambda: _op_args(True),
    "fused_step_/difference": lambda: _op_args(True, difference=True),
    "fused_step_/kept": lambda: _op_args(False),
}


# ------------------------------------------------------------------- models


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


# ------------------------------------------------------------ training cases


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
STEPS = 24
# hvp by finite differences (their steps take a closure): compared per step only, since a
# difference divides the gradients' round-off by eps, which would dominate a trajectory.
FINITE_DIFFERENCE = {
    "mlp-finite-difference": dict(cls=MLP, options=dict(lr=0.05, hvp="finite_difference", update_each=2,
                                                        weight_decay=0.01)),
    "cnn-central-difference-avg-channels-last": dict(
        cls=CNN, options=dict(lr=0.02, hvp="central_difference", n_samples=2, average_conv_kernel=True),
        channels_last=True,
    ),
}


def _low_precision(cls):
    # eps=1e-3 bounds the steps of elements whose D is near zero, which overflow float16.
    return dict(cls=cls, options=dict(lr=0.01, eps=1e-3, update_each=2, weight_decay=0.01,
                                      average_conv_kernel=cls is CNN))


# Low-precision parameters, per step from identical state.
LOW_PRECISION_CASES = {"mlp-low-precision": _low_precision(MLP), "cnn": _low_precision(CNN),
                       "transformer": _low_precision(Transformer),
                       "mlp-central-difference-low-precision": _low_precision(MLP)}
LOW_PRECISION_CASES["mlp-central-difference-low-precision"]["options"].update(hvp="central_difference", n_samples=2)
# Per step: float32 for every trajectory case, the MLP in bfloat16 and float16; the CUDA
# kernels also take the CNN and the Transformer in the low-precision dtypes.
PER_STEP = ([(n, torch.float32) for n in {**TRAJECTORIES, **FINITE_DIFFERENCE}]
            + [(n, d) for n in ("mlp-low-precision", "mlp-central-difference-low-precision") for d in LOW_PRECISION])
PER_STEP_CUDA = PER_STEP + [(n, d) for n in ("cnn", "transformer") for d in LOW_PRECISION]


def per_step_case(name, dtype):
    return LOW_PRECISION_CASES[name] if dtype in LOW_PRECISION else {**TRAJECTORIES, **FINITE_DIFFERENCE}[name]


def per_step_id(name, dtype):
    return f"{name}-{dtype_name(dtype)}"


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
    if opt.hvp != "autograd":  # Hessian steps evaluate the closure at the perturbed points too
        def closure():
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
        return
    opt.zero_grad()
    backward_and_step(_loss(model, batch), opt, scaler)


def setup(case, dtype, backend, device=CPU):
    """The case's model (seed 0), its optimizer and, for scaled cases, a GradScaler."""
    torch.manual_seed(0)
    model = case["cls"]().to(device, dtype)
    if case.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, backend, case["options"], case.get("groups", False))
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10) if case.get("scaled") else None
    return model, opt, scaler


def trajectories_match(case, device=CPU):
    """A float64 run of STEPS steps on each path: the parameters end within the
    trajectory bound of tests/tolerances.py (zero-gradient parameters, whose gain over a
    run is unbounded, excepted)."""
    ref_model, ref_opt, ref_scaler = setup(case, torch.float64, "reference", device)
    fused_model, fused_opt, fused_scaler = setup(case, torch.float64, "fused", device)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = to(device, case["cls"].batch(g))
        _step(ref_model, ref_opt, batch, ref_scaler)
        _step(fused_model, fused_opt, batch, fused_scaler)
    for (name, p), q in zip(ref_model.named_parameters(), fused_model.parameters()):
        if name not in getattr(case["cls"], "ZERO_GRAD", ()):
            tolerances.assert_trajectory_close(q, p, STEPS, name)
    if case.get("channels_last"):
        assert fused_model.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def steps_from_identical_state(case, dtype, steps, device=CPU):
    """Each step from identical state: the fused path starts from a copy of the
    reference model, optimizer state and GradScaler, takes the same step on the same
    batch, and must land within the error model of tests/tolerances.py; the next step
    starts again from the reference's state."""
    ref_model, ref_opt, scaler = setup(case, dtype, "reference", device)
    groups = {p: group for group in ref_opt.param_groups for p in group["params"]}
    average = case["options"].get("average_conv_kernel", False)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = to(device, case["cls"].batch(g))
        fused_model = copy.deepcopy(ref_model)
        fused_opt = _optimizer(fused_model, "fused", case["options"], case.get("groups", False))
        fused_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
        fused_opt.backend = "fused"  # the state dict carries the reference's backend setting
        fused_scaler = copy.deepcopy(scaler)
        before = {p: (p.detach().clone(), ref_opt.state[p].get("exp_avg", torch.zeros(())).clone()) for p in groups}
        _step(ref_model, ref_opt, batch, scaler)
        _step(fused_model, fused_opt, batch, fused_scaler)
        assert fused_opt.backend == "fused"
        for (name, p), q in zip(ref_model.named_parameters(), fused_model.parameters()):
            # The same code on bit-identical copies (one machine, one thread count) gives
            # bit-identical gradients: the step's inputs agree, so only the update differs.
            assert torch.equal(q.grad, p.grad), f"step {step} {name}: the gradients differ"
            want, got = ref_opt.state[p], fused_opt.state[q]
            assert want["step"] == got["step"]
            group = groups[p]
            tolerances.assert_step_close(
                dict(param=q, **{k: got.get(k) for k in STATE.values() if k != "param"}),
                dict(param=p, **{k: want.get(k) for k in STATE.values() if k != "param"}),
                dict(param=before[p][0], exp_avg=before[p][1]), p.grad.double(),  # unscaled by step()
                dict({k: group[k] for k in HYPER if k in group}, beta1=group["betas"][0], beta2=group["betas"][1],
                     step=want["step"]),
                dtypes=(dtype, dtype), group=averaging_group(p, dict(average_conv_kernel=average)), what=f"step {step} {name}",
            )
        if case.get("channels_last"):
            assert fused_model.conv2.weight.is_contiguous(memory_format=torch.channels_last)
