"""``AdaHessian``: a thin ``torch.optim.Optimizer`` that gathers tensor lists and hands
them to the functional core (:mod:`adahessian.functional`)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import amp, backends, distributed, functional, hutchinson, sampler

BACKENDS = ("auto", "fused", "reference")
# Optimizer-wide settings: kept in `defaults` and in every param group (as torch keeps
# `foreach` and `fused`), equal in all; read and changed through the attributes of the
# same names (README, "Where settings and counters live"). A change of those that shape
# D makes the next step a Hessian step.
SHAPE_D = ("update_each", "n_samples", "average_conv_kernel")
SETTINGS = (*SHAPE_D, "backend", "seed")
# Optimizer-level counters, also in every param group (plain ints and a dict of them):
# steps taken, the step from which Hessian steps are counted (the last change of a
# setting that shapes D), Rademacher vectors drawn per parameter so far (the sampler's
# `counter`), and the record of the Hessian-vector product's loss-scale factor.
COUNTERS = ("optimizer_step", "hessian_origin", "rademacher_counter", "hessian_scale")


def _setting(name: str, doc: str) -> property:
    def get(self: AdaHessian) -> Any:
        return (self.param_groups[0] if self.param_groups else self.defaults)[name]

    def set_(self: AdaHessian, value: Any) -> None:
        self.defaults[name] = value
        for group in self.param_groups:
            group[name] = value

    return property(get, set_, doc=doc)


class AdaHessian(Optimizer):
    """AdaHessian (Yao et al., AAAI 2021): Adam with the squared gradient replaced by
    the squared Hutchinson estimate of the Hessian diagonal.

    Arguments and defaults are the original pure-Python implementation's; ``backend``,
    ``seed`` and ``process_group`` are keyword-only additions. See the README for the
    full table. Raises ValueError for invalid values (README, "Arguments").
    """

    _step_supports_amp_scaling = True

    update_each = _setting("update_each", "Recompute the Hessian diagonal every this many steps (int >= 1).")
    n_samples = _setting("n_samples", "Rademacher vectors averaged per Hessian estimate (int >= 1).")
    average_conv_kernel = _setting("average_conv_kernel", "Average |D| over each conv kernel's spatial positions.")
    backend = _setting("backend", '"auto", "fused" or "reference" (README, "Backends").')
    seed = _setting("seed", "Seed of the counter-based Rademacher sampler, in [0, 2**32).")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_each: int = 1,
        n_samples: int = 1,
        average_conv_kernel: bool = False,
        *,
        backend: str = "auto",
        seed: int = 2147483647,
        process_group: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            update_each=update_each, n_samples=n_samples, average_conv_kernel=bool(average_conv_kernel),
            backend=backend, seed=seed,
        )
        _validate_hyperparameters(defaults)
        _validate_settings(defaults)
        self._init_runtime(process_group)
        super().__init__(params, defaults)
        self._settings = _validate_settings(self.param_groups[0])

    def _init_runtime(self, process_group: Any) -> None:
        """What the optimizer keeps besides `defaults`, `state` and `param_groups`: made
        anew by the constructor, and by unpickling and deepcopy (which save none of it)."""
        # torch.distributed: a ProcessGroup, "world" (the default group) or None.
        self.process_group = process_group
        self._group = None
        self._group_checked = False
        self._hessian_scale = amp.HessianScale()
        self._grad_scaler = None
        self._warned_no_graph: set[int] = set()
        self._backend_cache: dict[tuple[torch.device, str], str] = {}
        self._backward_modes = hutchinson.BackwardModes()
        self._backward_modes.bind(self)

    # ----------------------------------------------------------------- public API

    @property
    def hessian_due(self) -> bool:
        """True when the next ``step()`` recomputes the Hessian diagonal, i.e. needs
        ``loss.backward(create_graph=True)``; on other steps a plain backward is enough.
        Hessian steps are every ``update_each``-th step, counted from the first step and
        again from any change of ``update_each``, ``n_samples`` or
        ``average_conv_kernel`` (the next step after a change is a Hessian step, as in a
        fresh run with the new settings)."""
        self._sync_settings()
        return (self._counter("optimizer_step") - self._counter("hessian_origin")) % self.update_each == 0

    def attach_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Tell the optimizer which ``torch.amp.GradScaler`` scales its loss (None
        detaches). Needed only for ``scaler.unscale_(optimizer)`` before
        ``scaler.step(optimizer)`` (gradient clipping): ``unscale_`` unscales the
        gradients, and the Hessian-vector products, which carry the loss scale too, are
        then unscaled by the scaler's current scale. Not saved in ``state_dict``, nor by
        deepcopy or pickle."""
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"attach_grad_scaler expects a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self._grad_scaler = scaler

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's, plus AdaHessian's checks, all made before the group is added
        (a refused group leaves the optimizer unchanged): hyperparameters (ValueError),
        optimizer-wide settings equal to the other groups' (ValueError), no complex
        parameter (RuntimeError), and the backend available on the parameters' device
        (RuntimeError for backend="fused"; meta tensors are checked at step())."""
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch's own check refuses sets, with its message
            params = list(params)
        param_group["params"] = params
        group = {**self.defaults, **param_group}
        _validate_hyperparameters(group)
        _validate_settings(group)
        if self.param_groups:
            differ = [name for name in SETTINGS if group[name] != getattr(self, name)]
            if differ:
                raise ValueError(
                    f"AdaHessian: {', '.join(differ)} must be the same in every param group (an optimizer-wide "
                    f"setting); change it for all groups with optimizer.{differ[0]} = value"
                )
        for p in params if isinstance(params, list) else ():
            if torch.is_tensor(p) and p.is_complex():
                raise RuntimeError(
                    "AdaHessian does not support complex parameters (the Hessian diagonal of a "
                    "real loss in complex variables is not what its update assumes); optimize "
                    "torch.view_as_real(param) instead."
                )
            if torch.is_tensor(p) and p.device.type != "meta":
                self._backend_for(p.device, group["backend"])  # backend="fused" fails here, not at step()
        for name in COUNTERS:
            param_group[name] = _initial_counter(name) if not self.param_groups else copy.deepcopy(self._counter(name))
        first = len(self._flat_params())
        super().add_param_group(param_group)
        for i, p in enumerate(self.param_groups[-1]["params"]):
            self._backward_modes.watch(first + i, p)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step (closure: re-evaluates the model, calls
        ``backward(create_graph=...)`` and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._step()
        finally:
            self._release_graphs()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's. The settings and counters saved in the param groups win over
        the constructor's; a state dict saved by an earlier version (counters under a
        top-level "adahessian" key) loads too."""
        # torch casts every state tensor to its parameter's dtype; m, v and D of a
        # bfloat16/float16 parameter stay float32 (SPEC section 3): __setstate__ re-reads
        # them from the dict that is loaded, i.e. after every pre hook (ours runs last).
        loading: list[dict[str, Any]] = []
        handle = self.register_load_state_dict_pre_hook(lambda _, loaded: loading.append(loaded))
        self._loading = loading
        try:
            super().load_state_dict(_upgrade(state_dict, self.defaults))
        finally:
            handle.remove()
            del self._loading

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        # A ProcessGroup object cannot be pickled: "world" and None travel as they are;
        # a copy of an optimizer with another group must be given it again (README).
        state["process_group"] = distributed.picklable(self.process_group)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling and deepcopy, and the end of ``load_state_dict``: missing settings
        and counters are filled in, and the runtime is rebuilt."""
        process_group = state.pop("process_group", None)
        unpickled = "_backend_cache" not in self.__dict__
        super().__setstate__(state)
        for group in self.param_groups:
            for name in SETTINGS:
                group.setdefault(name, self.defaults[name])
            for name in COUNTERS:
                group.setdefault(name, _initial_counter(name))
        self.defaults.update({name: self.param_groups[0][name] for name in SETTINGS})
        if unpickled:
            self._init_runtime(process_group)
            for i, p in enumerate(self._flat_params()):
                self._backward_modes.watch(i, p)
        if self.__dict__.get("_loading"):
            self._restore_state_dtypes(self._loading[-1])
        self._hessian_scale.load_state_dict(self._counter("hessian_scale"))
        self._settings = _validate_settings(self.param_groups[0])
        self._group_checked = False  # re-check that the ranks agree on the loaded counters

    def _restore_state_dtypes(self, loaded: dict[str, Any]) -> None:
        """After torch's casts: ``step`` as a Python int (torch's own format stores a
        tensor), and float32 m, v and D for bfloat16/float16 parameters, from ``loaded``."""
        saved_ids = [i for group in loaded["param_groups"] for i in group["params"]]
        for saved_id, p in zip(saved_ids, self._flat_params()):
            state = self.state.get(p)
            if not state:
                continue
            if isinstance(state.get("step"), Tensor):
                state["step"] = int(state["step"].item())
            dtype = functional.state_dtype(p)
            if dtype != p.dtype:
                for key, value in loaded["state"][saved_id].items():
                    if isinstance(value, Tensor) and key != "step":
                        state[key] = value.to(device=p.device, dtype=dtype)

    # ------------------------------------------------------------------ internals

    def _flat_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _counter(self, name: str) -> Any:
        return self.param_groups[0][name]

    def _set_counter(self, name: str, value: Any) -> None:
        for group in self.param_groups:
            group[name] = copy.deepcopy(value) if isinstance(value, dict) else value

    def _backend_for(self, device: torch.device, requested: str | None = None) -> str:
        """The backend that runs on ``device`` for the ``requested`` one (default: the
        optimizer's), resolved once per pair (``auto`` warns once)."""
        key = (device, requested or self.backend)
        backend = self._backend_cache.get(key)
        if backend is None:
            backend = self._backend_cache[key] = backends.resolve(key[1], device)
        return backend

    def _sync_settings(self) -> None:
        """Validate the optimizer-wide settings when they changed since the last look
        (ValueError: a bad value, or groups that disagree); a change of one that shapes
        D restarts the count of Hessian steps here."""
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            differ = [name for name in SETTINGS if group[name] != first[name]]
            if differ:
                raise ValueError(
                    f"AdaHessian: the param groups disagree on {', '.join(differ)}, an optimizer-wide setting; "
                    f"set it for all groups with optimizer.{differ[0]} = value"
                )
        settings = tuple(first[name] for name in SETTINGS)
        if settings == self._settings:
            return
        shapes_d = settings[: len(SHAPE_D)] != self._settings[: len(SHAPE_D)]
        self._settings = _validate_settings(first)
        if shapes_d:
            self._set_counter("hessian_origin", self._counter("optimizer_step"))
        self._group_checked = False  # the ranks must agree on the new values

    def _step(self) -> None:
        scale = amp.loss_scale(self, self._grad_scaler)
        group = self._distributed_group()
        hessian_step = self.hessian_due
        entries, grads = self._gather(every_trainable=group is not None)
        if not entries:
            return
        if self._initialises_state(entries, grads):
            for _, _, p in entries:
                if not self.state[p]:
                    self.state[p].update(step=0, exp_avg=_zeros_like_state(p), exp_hessian_diag_sq=_zeros_like_state(p))
            return
        estimate, overflow = self._estimate(entries, grads, scale) if hessian_step else (None, None)
        # GradScaler semantics, decided here alone: a step with an inf/NaN in the
        # gradients (found by the scaler) or in Hz (found by the checked product, after
        # its back-offs) is skipped, and nothing changes. A checked product read both
        # flags at once; otherwise the scaler's flag is read now. Distributed, the
        # decision waits for the reduced values, so that every rank takes the same one.
        grad_scale = scale.grad_scale
        if group is not None:
            entries, grads, estimate = self._all_reduce(group, entries, grads, estimate, grad_scale)
            if scale.found_inf is not None and bool(functional.nonfinite(grads + _estimated(estimate))):
                return
            grad_scale = None  # unscaled before the reduce
        elif (amp.gradients_overflowed(scale) if overflow is None else overflow is not amp.Overflow.NONE):
            return

        self._update(entries, grads, estimate, grad_scale)
        self._set_counter("optimizer_step", self._counter("optimizer_step") + 1)
        if hessian_step:
            self._set_counter("rademacher_counter", self._counter("rademacher_counter") + self.n_samples)

    def _initialises_state(self, entries, grads) -> bool:
        """Is this torch.distributed.checkpoint making the state (its
        ``_init_optim_state``: one step, every lr set to 0, on zero gradients set by hand)?
        Then the step only creates the state a first step would, and counts nothing, so
        that a checkpoint of a fresh optimizer resumes as a fresh run."""
        if any(float(group["lr"]) != 0.0 for group in self.param_groups):
            return False
        return all(
            grad is None or (not grad.requires_grad and idx not in self._backward_modes.modes and not grad.any())
            for (_, idx, _), grad in zip(entries, grads)
        )

    def _gather(self, every_trainable: bool) -> tuple[list[tuple[int, int, Tensor]], list[Tensor | None]]:
        """(group index, flat parameter index, parameter) of every parameter with a
        gradient, and the gradients. Distributed, every parameter that requires grad
        takes part (None where this rank has no gradient): all ranks must lay out their
        buckets alike."""
        entries, grads = [], []
        flat_index = 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        "AdaHessian does not support sparse gradients: the Hessian-vector "
                        "product needs a dense gradient graph (use a dense nn.Embedding, "
                        "sparse=False)."
                    )
                if p.grad is not None or (every_trainable and p.requires_grad):
                    entries.append((g, flat_index, p))
                    grads.append(p.grad)
                flat_index += 1
        return entries, grads

    def _update(self, entries, grads, estimate, grad_scale) -> None:
        """Initialise state on first use, gather per (group, backend) lists, and run the
        functional core on each."""
        buckets: dict[tuple[int, str], dict[str, list]] = {}
        for n, (g, _, p) in enumerate(entries):
            state = self.state[p]
            if estimate is None:
                if "hessian" not in state:
                    continue  # no D yet: wait for the next Hessian step
            else:
                # The state a fresh run with today's settings has: D is kept between
                # Hessian steps only when update_each > 1 (settings may have changed).
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = _zeros_like_state(p)
                    state["exp_hessian_diag_sq"] = _zeros_like_state(p)
                if self.update_each > 1 and "hessian" not in state:
                    state["hessian"] = _zeros_like_state(p)
                elif self.update_each == 1:
                    state.pop("hessian", None)
            state["step"] += 1
            key = (g, p.device)  # one kernel call per device: model parallel splits
            lists = buckets.get(key)
            if lists is None:  # not setdefault: that would build the lists for every parameter
                lists = buckets[key] = _empty_lists()
            lists["params"].append(p)
            lists["grads"].append(grads[n])
            lists["exp_avgs"].append(state["exp_avg"])
            lists["exp_hessian_diag_sqs"].append(state["exp_hessian_diag_sq"])
            lists["hessians"].append(state.get("hessian"))
            lists["state_steps"].append(state["step"])
            if estimate is not None:
                for key in ("zs", "keys", "hzs"):
                    lists[key].append(getattr(estimate, key)[n])
                if estimate.partial_sums is not None:
                    lists["partial_sums"].append(estimate.partial_sums[n])

        for (g, device), lists in buckets.items():
            group = self.param_groups[g]
            beta1, beta2 = group["betas"]
            hessian_step = estimate is not None
            functional.adahessian(
                lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_hessian_diag_sqs"],
                lists["hessians"], lists["state_steps"],
                hzs=lists["hzs"] if hessian_step else None,
                zs=lists["zs"] if hessian_step else None,
                keys=lists["keys"] if hessian_step else None,
                partial_sums=lists["partial_sums"] if hessian_step and estimate.partial_sums is not None else None,
                n_samples=self.n_samples, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
                average_conv_kernel=self.average_conv_kernel, grad_scale=grad_scale, found_inf=None,
                backend=self._backend_for(device),
            )

    def _estimate(self, entries, grads, scale: amp.LossScale) -> tuple[Estimate, amp.Overflow | None]:
        """Hutchinson: per sample, one autograd call over every gradient that has a
        graph. Returns the last sample's z, sampler key and Hz per entry, and the sum
        of z * Hz over the earlier samples (None when n_samples == 1); and, under a loss
        scale, whether the step overflowed (None without one: nothing is checked)."""
        params = [p for _, _, p in entries]
        graph = [n for n, grad in enumerate(grads) if grad is not None and hutchinson.has_graph(grad)]
        self._check_graphs(entries, grads, any_graph=bool(graph))
        by_device: dict[torch.device, list[int]] = {}
        for n, p in enumerate(params):
            by_device.setdefault(p.device, []).append(n)

        partial_sums = None
        if self.n_samples > 1:
            partial_sums = [torch.zeros_like(p, dtype=functional.state_dtype(p)) for p in params]
        for s in range(self.n_samples):
            counter = self._counter("rademacher_counter") + s
            keys = [sampler.rademacher_key(self.seed, idx, counter) for _, idx, _ in entries]
            zs: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
            for device, ns in by_device.items():
                sampled = functional.sample_rademacher(
                    [params[n] for n in ns], [keys[n] for n in ns], backend=self._backend_for(device)
                )
                for n, z in zip(ns, sampled):
                    zs[n] = z
            hzs, overflow = self._hessian_vector_products(
                grads, params, zs, graph, scale, retain_graph=s < self.n_samples - 1
            )
            if overflow not in (None, amp.Overflow.NONE):
                break  # the step is skipped (every rank still joins the all-reduce)
            if s < self.n_samples - 1:
                for device, ns in by_device.items():
                    functional.accumulate_hessian_(
                        [partial_sums[n] for n in ns], [zs[n] for n in ns], [hzs[n] for n in ns],
                        keys=[keys[n] for n in ns], backend=self._backend_for(device),
                    )
        if overflow is not None and overflow is not amp.Overflow.GRADIENTS:
            self._hessian_scale.finished(ok=overflow is amp.Overflow.NONE)
        if overflow is not None:
            self._set_counter("hessian_scale", self._hessian_scale.state_dict())
        return Estimate(zs, keys, hzs, partial_sums), overflow

    def _hessian_vector_products(self, grads, params, zs, graph, scale, *, retain_graph):
        """One sample's Hz for every entry (zeros where a gradient has no graph, or where
        this rank has no gradient), and the overflow check's outcome under a loss scale
        (None without one)."""
        hzs: list[Tensor | None] = [None] * len(params)
        overflow = None
        if graph:
            args = ([grads[n] for n in graph], [params[n] for n in graph], [zs[n] for n in graph])
            if scale.hz_ratio is None:
                graph_hzs = hutchinson.hessian_vector_products(*args, retain_graph=retain_graph)
            else:
                graph_hzs, overflow = hutchinson.scaled_hessian_vector_products(
                    *args, scale=self._hessian_scale, hz_ratio=scale.hz_ratio, found_inf=scale.found_inf
                )
            for n, hz in zip(graph, graph_hzs):
                hzs[n] = hz
        return [torch.zeros_like(p) if hz is None else hz for hz, p in zip(hzs, params)], overflow

    def _distributed_group(self):
        """The resolved process group (None when single-process); on the first step,
        the one-time checks that the ranks agree."""
        if self._group_checked:
            return self._group
        self._group = distributed.resolve_group(self.process_group)
        if self._group is None:
            distributed.warn_if_ranks_would_diverge()
        else:
            device = next(iter(self._flat_params())).device
            distributed.check_same_everywhere(self._group, self._sync_fingerprint(), device)
        self._group_checked = True
        return self._group

    def _sync_fingerprint(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "step counter": self._counter("optimizer_step"),
            "Rademacher counter": self._counter("rademacher_counter"),
            "update_each": self.update_each,
            "n_samples": self.n_samples,
            "number of parameters": len(self._flat_params()),
        }

    def _all_reduce(self, group, entries, grads, estimate, grad_scale):
        """Average gradients (and, on Hessian steps, Hz and the partial sums) across
        ranks in one bucketed all-reduce, with a presence flag per parameter riding
        along: a parameter no rank has a gradient for is dropped, one some ranks lack
        gets their zeros. Unscales locally first: ranks' loss scales may differ."""
        present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=entries[0][2].device)
        grads = [torch.zeros_like(p) if g is None else g.detach() for (_, _, p), g in zip(entries, grads)]
        reduced = grads + _estimated(estimate)
        if grad_scale is not None:
            torch._foreach_mul_(reduced, grad_scale.double().reciprocal().item())
        distributed.all_reduce_mean_(reduced + [present], group)
        keep = [n for n, flag in enumerate(present.tolist()) if flag > 0]
        # grads[n] shares p.grad's storage, so p.grad now holds the average; a rank
        # that had no gradient gets one: every rank leaves step() with the same grads.
        for n in keep:
            if entries[n][2].grad is None:
                entries[n][2].grad = grads[n]
        if estimate is not None:
            estimate = Estimate(*([x[n] for n in keep] if x is not None else None for x in estimate))
        return [entries[n] for n in keep], [grads[n] for n in keep], estimate

    def _check_graphs(self, entries, grads, *, any_graph: bool) -> None:
        """The rule for gradients without a graph on a Hessian step (README, "Gradients
        without a graph"): after a backward without ``create_graph`` it is the user's to
        fix (RuntimeError); after one with it, the Hessian rows are zero (D = 0) and one
        warning per parameter names the possible causes. Where no hook saw the gradient
        arrive (set by hand), a step with no graph at all is taken for the former."""
        missing, plain = [], False
        for (_, idx, p), grad in zip(entries, grads):
            if grad is None or hutchinson.has_graph(grad) or p.numel() == 0:
                continue
            create_graph = self._backward_modes.modes.get(idx)
            plain = plain or create_graph is False or (create_graph is None and not any_graph)
            missing.append((idx, p))
        if plain:
            raise RuntimeError(hutchinson.NO_GRAPH_MESSAGE + distributed.ddp_hint())
        new = [(idx, p) for idx, p in missing if idx not in self._warned_no_graph]
        if new:
            self._warned_no_graph.update(idx for idx, _ in new)
            shapes = ", ".join(str(tuple(p.shape)) for _, p in new)
            warnings.warn(hutchinson.no_graph_warning(shapes), stacklevel=5)

    def _release_graphs(self) -> None:
        # backward(create_graph=True) makes param -> grad -> graph -> param cycles that
        # gc cannot see through (they pass through C++); dropping the graph breaks them.
        for p in self._flat_params():
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()


class Estimate(NamedTuple):
    """A Hessian step's Hutchinson data, aligned with the step's parameter list."""

    zs: list[Tensor]
    keys: list[int]
    hzs: list[Tensor]
    partial_sums: list[Tensor] | None


def _zeros_like_state(p: Tensor) -> Tensor:
    return torch.zeros_like(p, dtype=functional.state_dtype(p), memory_format=torch.preserve_format)


def _estimated(estimate: Estimate | None) -> list[Tensor]:
    """The estimate's tensors that carry the loss scale and cross ranks."""
    if estimate is None:
        return []
    return estimate.hzs + (estimate.partial_sums or [])


def _empty_lists() -> dict[str, list]:
    keys = ("params", "grads", "exp_avgs", "exp_hessian_diag_sqs", "hessians", "state_steps", "zs", "keys", "hzs", "partial_sums")
    return {k: [] for k in keys}


def _initial_counter(name: str) -> Any:
    return amp.HessianScale().state_dict() if name == "hessian_scale" else 0


def _upgrade(state_dict: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A state dict of an earlier version (counters and seed, later settings too, in a
    top-level "adahessian" key) in today's layout (all in the param groups); settings
    it lacks are today's."""
    if "adahessian" not in state_dict:
        return state_dict
    saved = state_dict["adahessian"]
    values = {name: saved.get(name, defaults[name]) for name in SETTINGS}
    values.update(
        optimizer_step=int(saved["step"]), hessian_origin=int(saved.get("hessian_origin", 0)),
        rademacher_counter=int(saved["counter"]),
        hessian_scale=dict(saved.get("hessian_scale", _initial_counter("hessian_scale"))),
    )
    groups = [{**group, **values} for group in state_dict["param_groups"]]
    return {**{k: v for k, v in state_dict.items() if k != "adahessian"}, "param_groups": groups}


def _validate_settings(group: dict[str, Any]) -> tuple:
    """Check the optimizer-wide settings in ``group`` (ValueError naming the bad one);
    their tuple."""
    update_each, n_samples, seed, backend = group["update_each"], group["n_samples"], group["seed"], group["backend"]
    if not (isinstance(update_each, int) and update_each >= 1):
        raise ValueError(f"Invalid update_each: {update_each} (an int >= 1)")
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise ValueError(f"Invalid n_samples: {n_samples} (an int >= 1)")
    if not isinstance(group["average_conv_kernel"], bool):
        raise ValueError(f"Invalid average_conv_kernel: {group['average_conv_kernel']!r} (a bool)")
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (one of {', '.join(map(repr, BACKENDS))})")
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise ValueError(f"Invalid seed: {seed} (an int in [0, 2**32))")
    return tuple(group[name] for name in SETTINGS)


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    lr, eps, betas, hessian_power = group["lr"], group["eps"], group["betas"], group["hessian_power"]
    if isinstance(lr, Tensor):
        raise ValueError(
            f"Invalid learning rate: a tensor ({lr!r}); AdaHessian takes lr as a Python float "
            "(its step is not capturable, so a tensor lr buys nothing): pass float(lr)"
        )
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= hessian_power <= 1.0:
        raise ValueError(f"Invalid Hessian power value: {hessian_power}")
