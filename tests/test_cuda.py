"""The CUDA kernels (csrc/cuda; docs/algorithm.md, sections 3-4) against the reference
path, on two targets: "cuda", a GPU, with TF32 off (skipped without one), and "emulated", the same
kernel code run on the CPU by tests/cuda_emulator.cpp (everywhere a compiler is). Checked:
bit-identical z across CPU and CUDA, the functional core per step from identical state,
views at every alignment (no access outside them), training runs on real models,
GradScaler. The cases and models are tests/cases.py's, shared with test_fused.py."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import cases
from adahessian import _build, _ops, backends, functional, sampler
from adahessian.functional import Difference

# Deterministic cuBLAS (read when CUDA initialises, so at import, before any test runs;
# tools/gpu_check.py sets it for its phases too).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CUDA = torch.device("cuda")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
EMULATOR = "adahessian_cuda_emulator"
_emulator_library = []  # keeps the emulator's schemas registered for the session


class Target(NamedTuple):
    """Where the CUDA kernels run, and the device their tensors live on."""

    name: str
    device: torch.device

    def to(self, x):
        """x with every tensor moved to the target's device (layouts kept), recursively."""
        return cases.to(self.device, x)


@pytest.fixture(scope="session")
def emulator(fused_kernels):
    """torch.ops.adahessian_cuda_emulator: adahessian's schemas, with the CUDA kernels'
    code compiled for the CPU (where the CPU kernels build, so does the emulator)."""
    from torch.utils import cpp_extension

    library = torch.library.Library(EMULATOR, "FRAGMENT")
    for name in _ops.OPS:
        library.define(str(getattr(torch.ops.adahessian, name).default._schema).split("::", 1)[1])
    _emulator_library.append(library)
    cpp_extension.load(
        name=EMULATOR, sources=[str(Path(__file__).with_name("cuda_emulator.cpp"))],
        extra_include_paths=_build.include_dirs(), extra_cflags=["-O2"], is_python_module=False,
    )
    return getattr(torch.ops, EMULATOR)


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=needs_gpu)])
def target(request, monkeypatch):
    if request.param == "cuda":
        # Exact float32 products, and the same convolution algorithms for both models: the
        # per-step checks need bit-identical gradients from the two model copies.
        flags = [(torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False),
                 (torch.backends.cudnn, "deterministic", True), (torch.backends.cudnn, "benchmark", False)]
        saved = [getattr(module, name) for module, name, _ in flags]
        for module, name, value in flags:
            setattr(module, name, value)
        # Deterministic reductions too (an H200 run found the two copies' gradients
        # differing; atomics-based kernels are the likely cause, not yet verified there).
        # warn_only: an op without a deterministic kernel warns, and the gradients'
        # equality check says whether it mattered.
        deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield Target("cuda", CUDA)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        for (module, name, _), value in zip(flags, saved):
            setattr(module, name, value)
        return
    emulated = request.getfixturevalue("emulator")
    # Every fused call on CPU tensors goes to the emulated CUDA kernels.
    monkeypatch.setattr(backends.fused, "kernels", lambda tensors: emulated)
    yield Target("emulated", torch.device("cpu"))


@needs_gpu
def test_fused_backend_is_available_on_cuda():
    assert backends.fused_unavailable_reason(CUDA) is None


@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=cases.dtype_name)
def test_rademacher_is_bit_identical_to_the_sampler(target, dtype):
    keys = [sampler.rademacher_key(2147483647, i, 9) for i in range(len(cases.SIZES))]
    like = [torch.empty(n, dtype=dtype, device=target.device) for n in cases.SIZES]
    like.append(torch.empty(6, 5, 3, 3, dtype=dtype, device=target.device).to(memory_format=torch.channels_last))
    keys.append(77)
    got = functional.sample_rademacher(like, keys, backend="fused")
    for t, k in zip(got, keys):
        assert torch.equal(t.cpu(), sampler.rademacher(t.shape, k, dtype=dtype))
        assert torch.equal(t, sampler.rademacher(t.shape, k, dtype=dtype, device=target.device))


@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=cases.dtype_name)
@pytest.mark.parametrize("difference", [False, True], ids=["hz", "difference"])
def test_accumulate_is_bit_identical_to_the_reference(target, dtype, difference):
    g = torch.Generator().manual_seed(0)
    shapes, keys = [(3, 40), (65536 + 5,), (2, 3, 5, 5)], [101, 202, 303]
    hzs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    bases = [torch.randn(s, generator=g).to(dtype) for s in shapes] if difference else None
    acc = [torch.randn(s, generator=g, dtype=functional.state_dtype(hzs[0])) for s in shapes]
    zs = [sampler.rademacher(s, k, dtype=dtype) for s, k in zip(shapes, keys)]
    want = [a.clone() for a in acc]
    products = dict(hzs=None, difference=Difference(hzs, bases, cases.INV_STEP)) if difference else dict(hzs=hzs)
    functional.accumulate_hessian_(want, zs, **products, backend="reference")
    got = target.to(acc)
    functional.accumulate_hessian_(got, target.to(zs), **target.to(products), keys=keys, backend="fused")
    assert all(torch.equal(a.cpu(), w) for a, w in zip(got, want))


@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=cases.dtype_name)
@pytest.mark.parametrize("case", list(cases.CORE_CASES))
@pytest.mark.parametrize("hessian_power", [1.0, 0.5, 0.7])
@pytest.mark.parametrize("average_conv_kernel", [False, True])
def test_functional_step_matches_the_reference(target, dtype, case, hessian_power, average_conv_kernel):
    lists, estimate = cases.problem(dtype, channels_last=average_conv_kernel, **cases.CORE_CASES[case])
    options = cases.core_options(cases.CORE_CASES[case]["n_samples"], hessian_power, average_conv_kernel)
    want = cases.run_functional("reference", lists, estimate, **options)
    got = cases.run_functional("fused", target.to(lists), target.to(estimate), **target.to(options))
    for g, w in zip(got["params"], want["params"]):
        assert g.device.type == target.device.type and g.stride() == w.stride()
    cases.assert_functional_close(got, want, lists, options)


@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=cases.dtype_name)
@pytest.mark.parametrize("case", list(cases.AVERAGING_OPTIONS))
@pytest.mark.parametrize("core", cases.AVERAGING_CORES)
def test_spatial_averaging_matches_the_reference(target, dtype, case, core):
    # The official rule and blocks (tests/test_averaging.py): groups of every length, in
    # channels-last tensors too, through the CUDA kernels' group reduction.
    cases.averaging_step_matches(dtype, case, core, target.to)


def _padded(tensors, offset):
    """Each tensor as a view `offset` elements into a buffer with a margin of 16
    elements on either side, filled with finite random sentinels (a read-modify-write
    past a view's end changes them; NaN margins would read NaN and write NaN back);
    returns the views and (buffer, the buffer's copy before the step)."""
    views, buffers = [], []
    for t in tensors:
        if t is None:
            views.append(None)
            continue
        g = torch.Generator().manual_seed(t.numel() + offset)
        buffer = torch.randn(t.numel() + offset + 32, generator=g).to(t.dtype).to(t.device)
        view = buffer[16 + offset : 16 + offset + t.numel()].view(t.shape)
        view.copy_(t)
        views.append(view)
        buffers.append((buffer, buffer.clone(), 16 + offset, t.numel()))
    return views, buffers


@pytest.mark.parametrize("dtype", cases.ALL_DTYPES, ids=cases.dtype_name)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("average_conv_kernel", [False, True])
@pytest.mark.parametrize("difference", [False, True], ids=["hz", "difference"])
def test_views_at_every_alignment_match_and_stay_inside(target, dtype, offset, average_conv_kernel, difference):
    # Packed loads need every pointer aligned (16 bytes for float32, 32 for float64); a
    # view's offset decides whether the vectorised path runs, and no path may touch the
    # margins around the views.
    before, estimate = cases.problem(dtype, hessian_step=True, kept=True, n_samples=2, channels_last=False,
                                     difference=difference)
    options = cases.core_options(2, 1.0, average_conv_kernel)
    want = cases.run_functional("reference", before, estimate, **options)
    lists, estimate = target.to(before), target.to(estimate)
    margins = []
    for name in ("params", "grads", "exp_avgs", "exp_hessian_diag_sqs", "hessians"):
        lists[name], buffers = _padded(lists[name], offset)
        margins += buffers
    for name in ("hzs", "partial_sums") if not difference else ("partial_sums",):
        padded, buffers = _padded(getattr(estimate, name), offset)
        estimate = estimate._replace(**{name: padded})
        margins += buffers
    for name in ("ahead", "behind") if difference else ():
        padded, buffers = _padded(getattr(estimate.difference, name), offset)
        estimate = estimate._replace(difference=estimate.difference._replace(**{name: padded}))
        margins += buffers
    functional.adahessian(*lists.values(), estimate=estimate, **options, backend="fused")
    cases.assert_functional_close(lists, want, before, options)
    for buffer, sentinels, start, numel in margins:
        assert torch.equal(buffer[:start], sentinels[:start]), "written before a view"
        assert torch.equal(buffer[start + numel :], sentinels[start + numel :]), "written past a view's end"


@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (2, 3, 7, 7), (2, 1, 30, 30), (1, 2, 50, 50), (1, 1, 300, 300)],
                         ids=lambda s: "x".join(map(str, s)))
def test_averaged_d_is_bit_identical_to_the_cpu_kernels(target, shape):
    # The group mean's summation order is math.h's on every backend: the CUDA kernels'
    # kept D equals the CPU kernels' bit for bit, for groups within a tile (3x3, 7x7,
    # 30x30: several threads' segments) and beyond it (50x50, and 300x300, a group larger
    # than a chunk), whose mean is summed over tiles first.
    g = torch.Generator().manual_seed(4)
    rand = lambda: torch.randn(shape, generator=g)  # noqa: E731
    tensors = dict(params=[rand()], grads=[rand()], exp_avgs=[rand()], exp_hessian_diag_sqs=[rand().abs()],
                   hessians=[rand()], hzs=[rand()])
    options = dict(bases=[], partial_sums=[], keys=[5], steps=[3], lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                   weight_decay=0.0, hessian_power=1.0, n_samples=1, inv_step=1.0,
                   groups=cases.kernel_groups([shape], average_conv_kernel=True))
    on_cpu, on_target = copy.deepcopy(tensors), target.to(tensors)
    _ops.ops().fused_step_(*on_cpu.values(), **options)
    backends.fused.kernels(on_target["params"]).fused_step_(*on_target.values(), **options)
    assert torch.equal(on_target["hessians"][0].cpu(), on_cpu["hessians"][0])
    d = on_cpu["hessians"][0]
    assert torch.equal(d, d[:, :, :1, :1].expand_as(d))  # one mean per group
    z = sampler.rademacher(shape, 5)
    want = (z * tensors["hzs"][0]).abs().double().mean(dim=(2, 3), keepdim=True).expand_as(d)
    assert torch.allclose(d.double(), want, rtol=shape[2] * shape[3] * 2.0**-24, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=cases.dtype_name)
@pytest.mark.parametrize("case", list(cases.IN_PLACE_CASES))
def test_dense_non_contiguous_tensors_are_stepped_in_place(target, case, dtype):
    kernels = backends.fused.kernels([torch.empty(0, device=target.device)])
    cases.in_place_step_matches(target.device, kernels, case, dtype)


@pytest.mark.parametrize("case", ["no averaging", "conv kernels"])
def test_hz_in_another_layout_costs_one_copy_each(target, case):
    kernels = backends.fused.kernels([torch.empty(0, device=target.device)])
    cases.in_place_step_matches(target.device, kernels, case, torch.float32, hz_elsewhere=True)


def test_thread_order_changes_no_bit(emulator):
    # Blocks and threads run in reverse: an element that two threads touch (a race on
    # the GPU) would come out different.
    lists, estimate = cases.problem(torch.float32, hessian_step=True, kept=True, n_samples=2, channels_last=True,
                                    difference=True)
    options = cases.core_options(2, 0.5, average_conv_kernel=True)
    options["groups"] = cases.kernel_groups([p.shape for p in lists["params"]],
                                            average_conv_kernel=options.pop("average_conv_kernel"))
    runs = []
    for reverse in (False, True):
        emulator.set_reverse_order(reverse)
        runs.append(copy.deepcopy(lists))
        emulator.fused_step_(
            *[runs[-1][k] for k in ("params", "grads", "exp_avgs", "exp_hessian_diag_sqs", "hessians")],
            hzs=estimate.difference.ahead, bases=estimate.difference.behind, partial_sums=estimate.partial_sums,
            keys=estimate.keys, steps=runs[-1]["state_steps"], inv_step=estimate.difference.inv_eps, **options,
        )
    emulator.set_reverse_order(False)
    for name in ("params", "exp_avgs", "exp_hessian_diag_sqs", "hessians"):
        assert all(torch.equal(a, b) for a, b in zip(runs[0][name], runs[1][name]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0]["params"], lists["params"]))


@needs_gpu
@pytest.mark.parametrize("case", list(cases.OPCHECK_CASES))
def test_opcheck(case):
    op = getattr(torch.ops.adahessian, case.split("/")[0]).default
    torch.library.opcheck(op, Target("cuda", CUDA).to(cases.OPCHECK_CASES[case]()))


@pytest.mark.parametrize("name", list(cases.TRAJECTORIES))
def test_training_trajectory_matches_the_reference(target, name):
    # float64 over a whole run; float32 per step below (tests/tolerances.py).
    cases.trajectories_match(cases.TRAJECTORIES[name], target.device)


@pytest.mark.parametrize("name,dtype", cases.PER_STEP_CUDA, ids=[cases.per_step_id(*c) for c in cases.PER_STEP_CUDA])
def test_steps_from_identical_state_match_the_reference(target, name, dtype):
    cases.steps_from_identical_state(cases.per_step_case(name, dtype), dtype, cases.STEPS, device=target.device)


# ------------------------------------------------------------- CUDA-graph capture


@pytest.mark.parametrize("name", _ops.OPS)
def test_ops_are_tagged_unsafe_for_cuda_graphs(fused_kernels, name):
    assert torch.Tag.cudagraph_unsafe in getattr(_ops.ops(), name).default.tags


@needs_gpu
@pytest.mark.parametrize("case", list(cases.OPCHECK_CASES))
def test_cuda_graph_capture_is_refused(case):
    # A replay would rerun the table's copy from a reused host buffer, with frozen step counts.
    args = Target("cuda", CUDA).to(cases.OPCHECK_CASES[case]())
    before = copy.deepcopy(args)
    op = getattr(torch.ops.adahessian, case.split("/")[0])
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            op(*args)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for x, y in zip(args, before) if isinstance(x, list)
               for a, b in zip(x, y) if torch.is_tensor(a))
    op(*args)  # outside capture the op runs


# ------------------------------------------- GPU only: what the emulator cannot see


def _cuda_problem(seed):
    lists, estimate = cases.problem(torch.float32, hessian_step=True, kept=True, n_samples=2,
                                         channels_last=False, seed=seed)
    return Target("cuda", CUDA).to(lists), Target("cuda", CUDA).to(estimate)


def _stepped_tensors(runs):
    return [t for lists, _ in runs for name in ("params", "exp_avgs", "exp_hessian_diag_sqs", "hessians")
            for t in lists[name]]


@needs_gpu
def test_launches_queued_behind_a_busy_gpu_match_a_synchronised_run():
    # Each call copies its table from a pinned host buffer asynchronously: a buffer
    # reused before its copy ran would hand a later launch another call's table. Two
    # tensor sets (tables of the same size) stepped back to back behind a busy GPU
    # must equal the same steps with a synchronisation after each, bit for bit.
    options = cases.core_options(2, 1.0, True)

    def run(synchronise):
        runs = [_cuda_problem(seed) for seed in (0, 1, 0, 1)]
        busy = torch.randn(4096, 4096, device=CUDA)
        torch.cuda.synchronize()
        for _ in range(20):  # tens of milliseconds of queued work
            busy = torch.tanh(busy @ busy)
        for lists, estimate in runs:
            functional.adahessian(*lists.values(), estimate=estimate, **options, backend="fused")
            if synchronise:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return runs

    queued, synchronised = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(_stepped_tensors(queued), _stepped_tensors(synchronised)))


@needs_gpu
def test_a_side_stream_matches_the_default_stream():
    options = cases.core_options(2, 0.5, True)
    default, side = [_cuda_problem(0)], [_cuda_problem(0)]
    functional.adahessian(*default[0][0].values(), estimate=default[0][1], **options, backend="fused")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10**7)  # the side stream is busy: work on the default stream would run first
        functional.adahessian(*side[0][0].values(), estimate=side[0][1], **options, backend="fused")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(_stepped_tensors(side), _stepped_tensors(default)))


# A tensor past 2^32 elements (bfloat16: 8.6 GB; its float32 state twice that): z near
# logical indices 2^31 (int32 overflow) and 2^32 (the high half of the index enters the
# hash) against the sampler's.
BIG = 2**32 + 2**16
WINDOWS = [(2**31 - 4096, 8192), (2**32 - 4096, 8192), (BIG - 1000, 1000)]


def _assert_z_in_windows(values, key):
    for start, count in WINDOWS:
        want = sampler.rademacher_signs(key, start, count, device=CUDA).to(torch.float32)
        assert torch.equal(values[start : start + count].float(), want), f"z differs in [{start}, {start + count})"


@needs_gpu
def test_logical_indices_past_2_to_the_31_and_32():
    out = torch.empty(BIG, dtype=torch.bfloat16, device=CUDA)
    torch.ops.adahessian.rademacher_([out], [77])
    _assert_z_in_windows(out, 77)
    del out
    # Column-major: the logical index of a memory offset past 2^32 (64-bit division there).
    out = torch.empty(2, BIG // 2, dtype=torch.bfloat16, device=CUDA).t()
    torch.ops.adahessian.rademacher_([out], [80])
    _assert_z_in_windows(out.contiguous().view(-1), 80)
    del out
    # accumulate_hessian_: partial_sum += z * 1, from zero.
    hz = torch.ones(BIG, dtype=torch.bfloat16, device=CUDA)
    acc = torch.zeros(BIG, dtype=torch.float32, device=CUDA)
    torch.ops.adahessian.accumulate_hessian_([acc], [hz], [], [78], 1.0)
    _assert_z_in_windows(acc, 78)
    del acc
    # fused_step_ keeps D = z * Hz / 1 = z.
    p, g = torch.zeros_like(hz), torch.zeros_like(hz)
    m, v, d = (torch.zeros(BIG, dtype=torch.float32, device=CUDA) for _ in range(3))
    torch.ops.adahessian.fused_step_([p], [g], [m], [v], [d], [hz], [], [], [79], [1], 0.01, 0.9, 0.999, 1e-8, 0.0,
                                     1.0, 1, 1.0, [0])
    _assert_z_in_windows(d, 79)
    del p, g, m, v, d, hz
    torch.cuda.empty_cache()


@needs_gpu
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad-scaler"])
def test_a_fused_step_synchronises_the_host_only_where_documented(scaled):
    # README, "Mixed precision": no host synchronisation without a GradScaler; with one,
    # one read per step (per try of the Hessian-vector product on a Hessian step).
    import warnings

    from adahessian import AdaHessian
    from training import backward_and_step

    torch.manual_seed(0)
    model = cases.MLP().to(CUDA)
    opt = AdaHessian(model.parameters(), backend="fused", update_each=2)
    scaler = torch.amp.GradScaler("cuda") if scaled else None
    g = torch.Generator().manual_seed(1)
    syncs = []
    for step in range(4):  # Hessian steps 0 and 2; 0 and 1 warm up (state, first-step checks)
        batch = Target("cuda", CUDA).to(cases.MLP.batch(g))
        opt.zero_grad()
        loss = cases._loss(model, batch)
        if step < 2:
            backward_and_step(loss, opt, scaler)
            continue
        (scaler.scale(loss) if scaled else loss).backward(create_graph=opt.hessian_due)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                scaler.step(opt) if scaled else opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append([str(w.message) for w in caught if "synchroniz" in str(w.message)])
        if scaled:
            scaler.update()
    assert all(len(s) <= (1 if scaled else 0) for s in syncs), syncs
