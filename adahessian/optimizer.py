"""``AdaHessian``: a thin ``torch.optim.Optimizer`` that gathers tensor lists and hands
them to the functional core (:mod:`adahessian.functional`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, functional, hutchinson, sampler

BACKENDS = ("auto", "fused", "reference")

UNSCALED_MESSAGE = (
    "AdaHessian cannot step after scaler.unscale_(optimizer): unscale_ divides the "
    "gradients by the loss scale, but the Hessian-vector products still carry it and the "
    "scaler no longer tells the optimizer what it was. Call scaler.step(optimizer) "
    "without unscale_ (AdaHessian unscales gradients and Hz itself), or train without "
    "GradScaler in this step."
)


class AdaHessian(Optimizer):
    """AdaHessian (Yao et al., AAAI 2021): Adam with the squared gradient replaced by
    the squared Hutchinson estimate of the Hessian diagonal.

    Arguments and defaults are the original pure-Python implementation's; ``backend``
    and ``seed`` are keyword-only additions. See the README for the full table.
    """

    _step_supports_amp_scaling = True

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
    ) -> None:
        if not (isinstance(update_each, int) and update_each >= 1):
            raise ValueError(f"Invalid update_each: {update_each} (an int >= 1)")
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"Invalid n_samples: {n_samples} (an int >= 1)")
        if not (isinstance(seed, int) and 0 <= seed < 2**32):
            raise ValueError(f"Invalid seed: {seed} (an int in [0, 2**32))")
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (one of {', '.join(map(repr, BACKENDS))})")
        # Optimizer-wide settings, as in the original (not per group, not in `defaults`).
        self.update_each = update_each
        self.n_samples = n_samples
        self.average_conv_kernel = bool(average_conv_kernel)
        self.backend = backend
        self.seed = seed
        # Optimizer-level counters (plain ints, saved by state_dict): steps taken, and
        # Rademacher vectors drawn per parameter so far (the sampler's `counter`).
        self._step_count_total = 0
        self._rademacher_counter = 0
        self._warned_no_graph: set[int] = set()
        self._backend_cache: dict[torch.device, str] = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        _validate_hyperparameters(defaults)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- public API

    @property
    def hessian_due(self) -> bool:
        """True when the next ``step()`` recomputes the Hessian diagonal, i.e. needs
        ``loss.backward(create_graph=True)``; on other steps a plain backward is enough."""
        return self._step_count_total % self.update_each == 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hyperparameters(group)
        for p in group["params"]:
            if p.is_complex():
                raise RuntimeError(
                    "AdaHessian does not support complex parameters (the Hessian diagonal of a "
                    "real loss in complex variables is not what its update assumes); optimize "
                    "torch.view_as_real(param) instead."
                )
        for p in group["params"]:
            self._backend_for(p.device)  # backend="fused" fails here, not at the first step

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

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        state_dict["adahessian"] = {
            "step": self._step_count_total,
            "counter": self._rademacher_counter,
            "seed": self.seed,
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop("adahessian", None)
        super().load_state_dict(state_dict)
        if counters is not None:
            self._step_count_total = int(counters["step"])
            self._rademacher_counter = int(counters["counter"])
            self.seed = int(counters["seed"])
        # Optimizer.load_state_dict casts every state tensor to its parameter's dtype;
        # a bfloat16/float16 parameter's state stays float32 (SPEC section 3).
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved_ids, self._flat_params()):
            dtype = functional.state_dtype(p)
            if dtype == p.dtype or saved_id not in state_dict["state"]:
                continue
            for key, value in state_dict["state"][saved_id].items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=dtype)

    # ------------------------------------------------------------------ internals

    def _flat_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _backend_for(self, device: torch.device) -> str:
        backend = self._backend_cache.get(device)
        if backend is None:
            backend = backends.resolve(self.backend, device)
            self._backend_cache[device] = backend
        return backend

    def _step(self) -> None:
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and grad_scale is None:
            raise RuntimeError(UNSCALED_MESSAGE)

        hessian_step = self.hessian_due
        # (group index, flat parameter index, parameter) of every parameter with a gradient.
        entries: list[tuple[int, int, Tensor]] = []
        flat_index = 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            "AdaHessian does not support sparse gradients: the Hessian-vector "
                            "product needs a dense gradient graph (use a dense nn.Embedding, "
                            "sparse=False)."
                        )
                    entries.append((g, flat_index, p))
                flat_index += 1
        if not entries:
            return

        # GradScaler semantics: a step with an inf/NaN in the gradients (found by the
        # scaler) or in Hz (found here) is skipped, and nothing changes.
        if found_inf is not None and bool(found_inf):
            return
        hzs = zs = keys = partial_sums = None
        if hessian_step:
            zs, keys, hzs, partial_sums = self._estimate(entries)
            if grad_scale is not None and bool(functional.nonfinite(hzs + (partial_sums or []))):
                return

        # Gather per (group, backend) lists; initialise state on first use.
        buckets: dict[tuple[int, str], dict[str, list]] = {}
        for n, (g, _, p) in enumerate(entries):
            state = self.state[p]
            if not state:
                if not hessian_step:
                    continue  # no D yet: wait for the next Hessian step
                dtype = functional.state_dtype(p)
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_hessian_diag_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                if self.update_each > 1:
                    state["hessian"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            elif not hessian_step and "hessian" not in state:
                continue
            state["step"] += 1
            lists = buckets.setdefault((g, self._backend_for(p.device)), _empty_lists())
            lists["params"].append(p)
            lists["grads"].append(p.grad)
            lists["exp_avgs"].append(state["exp_avg"])
            lists["exp_hessian_diag_sqs"].append(state["exp_hessian_diag_sq"])
            lists["hessians"].append(state.get("hessian"))
            lists["state_steps"].append(state["step"])
            if hessian_step:
                lists["zs"].append(zs[n])
                lists["hzs"].append(hzs[n])
                lists["keys"].append(keys[n])
                if partial_sums is not None:
                    lists["partial_sums"].append(partial_sums[n])

        for (g, backend), lists in buckets.items():
            group = self.param_groups[g]
            beta1, beta2 = group["betas"]
            functional.adahessian(
                lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_hessian_diag_sqs"],
                lists["hessians"], lists["state_steps"],
                hzs=lists["hzs"] if hessian_step else None,
                zs=lists["zs"] if hessian_step else None,
                keys=lists["keys"] if hessian_step else None,
                partial_sums=lists["partial_sums"] if partial_sums is not None else None,
                n_samples=self.n_samples, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
                average_conv_kernel=self.average_conv_kernel, grad_scale=grad_scale, found_inf=found_inf, backend=backend,
            )

        self._step_count_total += 1
        if hessian_step:
            self._rademacher_counter += self.n_samples

    def _estimate(self, entries):
        """Hutchinson: per sample, one autograd call over every gradient that has a
        graph. Returns the last sample's z, sampler key and Hz per entry, and the sum of z * Hz
        over the earlier samples (None when n_samples == 1)."""
        params = [p for _, _, p in entries]
        grads = [p.grad for p in params]
        graph = [n for n, grad in enumerate(grads) if hutchinson.has_graph(grad)]
        if not graph:
            raise RuntimeError(hutchinson.NO_GRAPH_MESSAGE)
        self._warn_no_graph([(idx, p) for (_, idx, p), grad in zip(entries, grads) if not hutchinson.has_graph(grad)])
        backends_ = [self._backend_for(p.device) for p in params]

        partial_sums = None
        if self.n_samples > 1:
            partial_sums = [torch.zeros_like(p, dtype=functional.state_dtype(p)) for p in params]
        for s in range(self.n_samples):
            keys = [sampler.rademacher_key(self.seed, idx, self._rademacher_counter + s) for _, idx, _ in entries]
            zs: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
            for backend in set(backends_):
                ns = [n for n, b in enumerate(backends_) if b == backend]
                sampled = functional.sample_rademacher([params[n] for n in ns], [keys[n] for n in ns], backend=backend)
                for n, z in zip(ns, sampled):
                    zs[n] = z
            hzs = [torch.zeros_like(p) for p in params]
            graph_hzs = hutchinson.hessian_vector_products(
                [grads[n] for n in graph], [params[n] for n in graph], [zs[n] for n in graph],
                retain_graph=s < self.n_samples - 1,
            )
            for n, hz in zip(graph, graph_hzs):
                hzs[n] = hz
            if s < self.n_samples - 1:
                for backend in set(backends_):
                    ns = [n for n, b in enumerate(backends_) if b == backend]
                    functional.accumulate_hessian_(
                        [partial_sums[n] for n in ns], [zs[n] for n in ns], [hzs[n] for n in ns], backend=backend
                    )
        return zs, keys, hzs, partial_sums

    def _warn_no_graph(self, missing: list[tuple[int, Tensor]]) -> None:
        new = [(idx, p) for idx, p in missing if idx not in self._warned_no_graph]
        if not new:
            return
        self._warned_no_graph.update(idx for idx, _ in new)
        shapes = ", ".join(str(tuple(p.shape)) for _, p in new)
        warnings.warn(
            f"AdaHessian: the gradient of parameter(s) of shape {shapes} has no autograd graph "
            "(its value does not depend on any parameter), so its Hessian rows are zero: D = 0 "
            "and its update divides by eps alone. Check that this is intended.",
            stacklevel=4,
        )

    def _release_graphs(self) -> None:
        # backward(create_graph=True) makes param -> grad -> graph -> param cycles that
        # gc cannot see through (they pass through C++); dropping the graph breaks them.
        for p in self._flat_params():
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()


def _empty_lists() -> dict[str, list]:
    keys = ("params", "grads", "exp_avgs", "exp_hessian_diag_sqs", "hessians", "state_steps", "zs", "keys", "hzs", "partial_sums")
    return {k: [] for k in keys}


def _validate_hyperparameters(group: dict[str, Any]) -> None:
    lr, eps, betas, hessian_power = group["lr"], group["eps"], group["betas"], group["hessian_power"]
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= hessian_power <= 1.0:
        raise ValueError(f"Invalid Hessian power value: {hessian_power}")
