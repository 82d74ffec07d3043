"""``AdaHessian``: a thin ``torch.optim.Optimizer`` that gathers tensor lists and hands
them to the functional core (:mod:`adahessian.functional`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import amp, averaging, distributed, finite_difference, functional, hutchinson
from .backends import BACKENDS, resolve
from .precision import state_dtype

# Optimizer-wide settings: kept in `defaults` and in every param group (as torch keeps
# `foreach` and `fused`), equal in all; read and changed through the attributes of the
# same names (README, "Where settings and counters live"). A change of those that shape
# D makes the next step a Hessian step.
SHAPE_D = ("update_each", "n_samples", "average_conv_kernel", "spatial_averaging", "block_length")
SETTINGS = (*SHAPE_D, "backend", "seed", "hvp")
HVPS = ("autograd", *finite_difference.SCHEMES)
# Optimizer-level counters, also in every param group (plain ints and a dict of them):
# steps taken, the step from which Hessian steps are counted (the last change of a
# setting that shapes D), Rademacher vectors drawn per parameter so far (the sampler's
# `counter`), and the record of the Hessian-vector product's loss-scale factor.
COUNTERS = ("optimizer_step", "hessian_origin", "rademacher_counter", "hessian_scale")
# hessian_backward's default floor on |D|, relative to its tensor's mean |D|.
SUB_BATCH_FLOOR = 0.1
FD_SCALER_MESSAGE = (
    "AdaHessian(hvp={hvp!r}) does not combine with a GradScaler: its Hessian steps need "
    "step(closure), and GradScaler.step refuses a closure. Use bfloat16 autocast (it needs "
    "no scaler), or hvp='autograd' with the scaler."
)


def _setting(name: str, doc: str) -> property:
    def get(self: AdaHessian) -> Any:
        return (self.param_groups[0] if self.param_groups else self.defaults)[name]

    def set_(self: AdaHessian, value: Any) -> None:
        self.defaults[name] = value
        for group in self.param_groups:
            group[name] = value

    return property(get, set_, doc=doc)


class AdaHessian(Optimizer):
    r"""AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for
    Machine Learning", AAAI 2021): Adam with the squared gradient replaced by the squared
    Hutchinson estimate of the Hessian diagonal (docs/algorithm.md).

    .. math::
        \begin{aligned}
        &D_t = \tfrac{1}{S}\textstyle\sum_s z_s \odot H z_s \quad
            \text{(every update\_each steps, else } D_{t-1}\text{; } z_s \in \{\pm 1\}^n)\\
        &\theta \leftarrow \theta (1 - \gamma\lambda), \quad
            m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
            v_t = \beta_2 v_{t-1} + (1 - \beta_2) D_t^2\\
        &\theta \leftarrow \theta - \frac{\gamma}{1 - \beta_1^t}\, m_t \Big/
            \Big(\big(v_t / (1 - \beta_2^t)\big)^{k/2} + \epsilon\Big)
        \end{aligned}

    On a Hessian step (``hessian_due``) the gradients must carry their graph:
    ``loss.backward(create_graph=True)``, or :meth:`backward` (which frees each graph at
    once, for gradient accumulation), or :meth:`hessian_backward` for the Hessian of a
    sub-batch; the Hessian-vector products ``Hz`` then cost about one more backward pass
    per sample. With ``hvp="finite_difference"`` no graph is needed: ``step(closure)``
    evaluates the loss again at perturbed parameters. Positional arguments and defaults
    are the original pure-Python implementation's.

    Args:
        params (iterable): parameters (real, dense) or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` >= 0, a Python number
            (default: 0.1).
        betas (tuple[float, float], optional): :math:`\beta_1, \beta_2` in [0, 1), the
            averaging coefficients of the gradient and of :math:`D^2`
            (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon` >= 0 added to the denominator
            (default: 1e-8; 1e-4 is markedly more stable on small CNNs and transformers).
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` >= 0, as
            in AdamW (default: 0).
        hessian_power (float, optional): the exponent :math:`k` in [0, 1] of the
            curvature in the denominator (default: 1).
        update_each (int, optional): recompute D every this many steps (>= 1); the
            steps between cost about an Adam step (default: 1).
        n_samples (int, optional): Rademacher vectors :math:`S` per estimate (>= 1),
            each one more Hessian-vector product (default: 1).
        average_conv_kernel (bool, optional): average :math:`|D|` over each 4-D conv
            weight's spatial positions, as in the paper (default: False). Only 4-D
            tensors: Conv1d (3-D) and Conv3d (5-D) weights stay per element (see
            ``spatial_averaging`` for Conv1d). Read only with
            ``spatial_averaging="conv2d"``.
        spatial_averaging (str, keyword-only): ``"conv2d"`` (``average_conv_kernel``
            decides, as above) or ``"official"``, the official implementation's
            ``instruction/`` rule whatever ``average_conv_kernel`` says: :math:`|D|`
            averaged over dims 2, 3 of 4-D weights, the last dim of 3-D (Conv1d)
            weights, the rows of 2-D weights, per element for 0-D and 1-D tensors;
            5-D (Conv3d) weights are refused with a ValueError at ``step()``, as the
            official code refuses them (default: ``"conv2d"``).
        block_length (int, keyword-only): >= 1; above 1, :math:`|D|` averaged over
            consecutive blocks of this many elements of every flattened tensor, the
            official fairseq version's ``--block-length`` (its IWSLT runs used 32). Every
            parameter's size must be a multiple (ValueError at ``step()`` naming the
            tensor otherwise); combines with neither ``average_conv_kernel=True`` nor
            ``"official"`` (default: 1, no block averaging).
        backend (str, keyword-only): ``"auto"`` (the compiled kernels where available
            for the parameters' device, else the reference path with one warning),
            ``"fused"`` (RuntimeError where unavailable) or ``"reference"``
            (default: ``"auto"``).
        seed (int, keyword-only): seed of the counter-based Rademacher sampler, in
            [0, 2**32) (default: 2147483647).
        process_group (keyword-only): ``None``, ``"world"`` or a
            ``torch.distributed`` process group whose ranks' gradients and Hessian
            estimates are averaged (default: None).
        hvp (str, keyword-only): how Hessian-vector products are computed:
            ``"autograd"`` (double backward, exact), ``"finite_difference"`` (the
            forward difference of two plain gradients: one extra evaluation of the
            closure per sample, error O(eps) + O(u/eps)) or ``"central_difference"``
            (two extra, O(eps^2) + O(u/eps)); the last two need ``step(closure)`` on
            Hessian steps and work where double backward does not (DDP-wrapped and
            compiled models, fused attention; README, "Without double backward")
            (default: ``"autograd"``).

    Raises:
        ValueError: an argument outside its range (the original's rules, plus
            ``weight_decay``, ``update_each``, ``n_samples``, ``seed``, ``backend``,
            ``hvp`` and a tensor ``lr``); also at ``step()`` for a setting changed to a
            bad value.
        RuntimeError: complex parameters, sparse gradients, ``backend="fused"`` where
            the kernels are unavailable; at ``step()``, gradients computed without
            ``create_graph=True`` on a Hessian step, or a model part without double
            backward (fused attention: see :func:`adahessian.math_attention`); with a
            finite-difference ``hvp``, a Hessian step without a closure, or a GradScaler.

    Settings and counters live in ``defaults`` and every param group (README, "Where
    settings and counters live"); GradScaler works, with gradient clipping through
    :meth:`attach_grad_scaler` (README, "Mixed precision").
    """

    _step_supports_amp_scaling = True
    # timm's train.py reads this and passes create_graph=True to every backward (its loss scalers' too).
    is_second_order = True

    update_each = _setting("update_each", "Recompute the Hessian diagonal every this many steps (int >= 1).")
    n_samples = _setting("n_samples", "Rademacher vectors averaged per Hessian estimate (int >= 1).")
    average_conv_kernel = _setting("average_conv_kernel", "Average |D| over each conv kernel's spatial positions.")
    spatial_averaging = _setting("spatial_averaging", '"conv2d" or "official" (adahessian/averaging.py).')
    block_length = _setting("block_length", "Average |D| over blocks of this many elements (1: no blocks).")
    backend = _setting("backend", '"auto", "fused" or "reference" (README, "Backends").')
    seed = _setting("seed", "Seed of the counter-based Rademacher sampler, in [0, 2**32).")
    hvp = _setting("hvp", '"autograd", "finite_difference" or "central_difference" (README, "Without double backward").')

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
        spatial_averaging: str = "conv2d",
        block_length: int = 1,
        seed: int = 2147483647,
        process_group: Any = None,
        hvp: str = "autograd",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
            update_each=update_each, n_samples=n_samples, average_conv_kernel=bool(average_conv_kernel),
            spatial_averaging=spatial_averaging, block_length=block_length, backend=backend, seed=seed, hvp=hvp,
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
        self._backend_cache: dict[tuple[torch.device, str], str] = {}
        self._graph_record = hutchinson.GraphRecord()
        self._graph_record.bind(self)
        # Hessian-vector products that backward()/hessian_backward() summed for the next step.
        self._accumulated: hutchinson.Accumulated | None = None
        # The parameters _check_shapes passed, under these settings (the tuple itself).
        self._shapes_checked: tuple[tuple | None, set[Tensor]] = (None, set())

    # ----------------------------------------------------------------- public API

    @property
    def hessian_due(self) -> bool:
        """True when the next ``step()`` recomputes the Hessian diagonal, i.e. needs
        ``loss.backward(create_graph=True)`` (with ``hvp="autograd"``; a finite-difference
        ``hvp`` needs ``step(closure)`` instead); on other steps a plain backward is enough.
        Hessian steps are every ``update_each``-th step, counted from the first step and
        again from any change of ``update_each``, ``n_samples`` or
        ``average_conv_kernel``, ``spatial_averaging`` or ``block_length`` (the next step after a change is a Hessian step, as in a
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
            _check_same_settings(group, self.param_groups[0])
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
            self._graph_record.watch(first + i, p)

    def backward(self, loss: Tensor) -> None:
        """The drop-in for ``loss.backward(create_graph=optimizer.hessian_due)`` that
        keeps no graph: accumulates the gradient of ``loss`` (a scalar tensor that
        requires grad; ``scaler.scale(loss)`` under a GradScaler) into the ``.grad`` of
        this optimizer's parameters (only theirs, as ``loss.backward(inputs=...)``) and,
        on a Hessian step, also its Hessian-vector products with the step's z for all
        ``n_samples``, then frees the graph before returning. Called once per
        micro-batch, the next ``step()`` uses the summed gradient and
        ``D = z * sum(Hz)``, which equals one backward on the summed loss (to float
        rounding; models with batch statistics differ as their gradients do), with the
        memory of one micro-batch's graph. On other steps, and always with a
        finite-difference ``hvp`` (whose Hessian steps still need ``step(closure)``), it
        is a plain backward into the same parameters. Costs, on a Hessian step, what
        ``create_graph=True`` plus the step's products cost. ``zero_grad()`` drops the
        products as it drops the gradients.

        Raises:
            RuntimeError: ``loss`` does not require grad or reaches none of the
                parameters; the gradients already carry a graph from
                ``loss.backward(create_graph=True)`` in this step (mixing both paths);
                ``n_samples`` or ``seed`` changed, or a state dict loaded, since the
                step's first call; fused attention in the graph (see
                :func:`adahessian.math_attention`).
        """
        self._backward(loss, gradients=True)

    def hessian_backward(self, loss: Tensor, *, floor: float = SUB_BATCH_FLOOR) -> None:
        """Accumulate the Hessian-vector products of ``loss`` for the next step without
        touching the gradients: the Hessian on a sub-batch. With ``loss.backward()`` on
        the full batch and ``hessian_backward(loss_fn(model(x[:k]), y[:k]))`` on a
        Hessian step, D estimates the Hessian diagonal of the full-batch mean loss from
        k samples (unbiased for models without batch statistics, before the floor) at
        about k/batch of the double backward's cost and memory; several calls add up,
        as with :meth:`backward`. On steps that are not Hessian steps it returns at
        once: guard the sub-batch's forward pass with ``if optimizer.hessian_due`` to
        skip its cost. Parameters with a gradient that no such loss reached get D = 0
        (one warning).

        Args:
            loss (Tensor): a scalar that requires grad, e.g. the mean loss of the
                sub-batch (``scaler.scale(loss)`` under a GradScaler).
            floor (float, keyword-only): after the step's products are summed (and
                averaged across ranks), each |D| below ``floor`` times the mean |D| of
                its tensor is raised to that value, in [0, 1] (default: 0.1; the
                largest of the step's calls applies). A sub-batch misses the units a
                ReLU network uses only on other samples: their D is zero while the
                full batch's gradient is not, and the update divides by eps alone
                (README, "Gradient accumulation and a sub-batch Hessian", with the
                measurements behind the default). 0 gives the plain estimate.

        Raises:
            ValueError: ``floor`` not a number in [0, 1].
            RuntimeError: as :meth:`backward`; also with a finite-difference ``hvp``
                (this differentiates twice, which that setting is there to avoid).
        """
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
            raise ValueError(f"Invalid floor: {floor!r} (a fraction of the mean |D|, in [0, 1])")
        self._backward(loss, gradients=False)
        if self._accumulated is not None:
            self._accumulated.floor = max(self._accumulated.floor, floor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's; also drops the Hessian-vector products accumulated by
        :meth:`backward` and :meth:`hessian_backward` since the last step."""
        super().zero_grad(set_to_none)
        self._accumulated = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step. ``closure`` re-evaluates the model: it
        zeroes the gradients, computes the loss, calls ``backward(create_graph=...)``
        (a plain ``backward()`` with ``hvp="finite_difference"``/``"central_difference"``,
        whose Hessian steps need it: they evaluate it again at perturbed parameters)
        and returns the loss, which ``step`` returns (at the unperturbed parameters)."""
        if self.hvp != "autograd" and (getattr(self, "found_inf", None) is not None or self._grad_scaler is not None):
            raise RuntimeError(FD_SCALER_MESSAGE.format(hvp=self.hvp))
        loss = None
        try:
            if self.hvp != "autograd" and self.hessian_due:
                loss = self._differences(closure)
            elif closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._step()
        finally:
            self._accumulated = None
            self._release_graphs()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's. The settings and counters saved in the param groups win over
        the constructor's; a state dict saved by an earlier version (counters under a
        top-level "adahessian" key) loads too."""
        # torch casts every state tensor to its parameter's dtype; m, v and D of a
        # bfloat16/float16 parameter stay float32 (docs/algorithm.md, section 1): __setstate__ re-reads
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
                self._graph_record.watch(i, p)
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
            dtype = state_dtype(p)
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
            backend = self._backend_cache[key] = resolve(key[1], device)
        return backend

    def _sync_settings(self) -> None:
        """Validate the optimizer-wide settings when they changed since the last look
        (ValueError: a bad value, or groups that disagree); a change of one that shapes
        D restarts the count of Hessian steps here."""
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            _check_same_settings(group, first)
        settings = tuple(first[name] for name in SETTINGS)
        if not any(map(_differs, settings, self._settings)):
            return
        shapes_d = any(map(_differs, settings[: len(SHAPE_D)], self._settings[: len(SHAPE_D)]))
        self._settings = _validate_settings(first)
        if shapes_d:
            self._set_counter("hessian_origin", self._counter("optimizer_step"))
        self._group_checked = False  # the ranks must agree on the new values

    def _backward(self, loss: Tensor, *, gradients: bool) -> None:
        """backward() (``gradients``) and hessian_backward()."""
        if not (isinstance(loss, Tensor) and loss.requires_grad):
            raise RuntimeError(
                f"AdaHessian.{'backward' if gradients else 'hessian_backward'}() needs a loss tensor that "
                f"requires grad, got {loss!r}: compute it from the model's outputs with grad mode on "
                "(not under torch.no_grad() or inference_mode, and not .detach()ed or .item())."
            )
        pairs = [(idx, p) for idx, p in enumerate(self._flat_params()) if p.requires_grad]
        indices, params = [idx for idx, _ in pairs], [p for _, p in pairs]
        if self.hvp != "autograd" and not gradients:
            raise RuntimeError(
                f"AdaHessian.hessian_backward() differentiates twice, which hvp={self.hvp!r} is there to "
                "avoid: its Hessian steps take the products from step(closure). Use hvp='autograd' for a "
                "sub-batch Hessian."
            )
        if not self.hessian_due or self.hvp != "autograd":
            if gradients:
                torch.autograd.backward(loss, inputs=params)
            return
        self._refuse_mixing([p.grad for p in params])
        if self._accumulated is None:
            self._accumulated = self._new_accumulated()
        self._check_accumulated(self._accumulated)
        try:
            if gradients:
                before = [p.grad for p in params]
                torch.autograd.backward(loss, inputs=params, create_graph=True)
                grads = [p.grad if p.grad is not b else None for p, b in zip(params, before)]
            else:
                grads = list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))
            if all(g is None for g in grads):
                raise RuntimeError(
                    "AdaHessian: the loss reaches none of the optimizer's parameters (no gradient "
                    "flows to them): pass the loss computed from the model this optimizer trains."
                )
            hutchinson.accumulate_(
                self._accumulated, grads, params, indices, seed=self.seed, backend_for=self._backend_for,
                record=self._graph_record, retain_graph=False,
            )
        finally:
            self._release_graphs()

    def _refuse_mixing(self, grads: list[Tensor | None]) -> None:
        if any(g is not None and hutchinson.has_graph(g) for g in grads):
            raise RuntimeError(
                "AdaHessian: this step mixes optimizer.backward()/hessian_backward() with "
                "loss.backward(create_graph=True); use one of them per step (optimizer.backward(loss) "
                "is the drop-in for loss.backward(create_graph=...))."
            )

    def _differences(self, closure: Callable[[], Any] | None) -> Any:
        """A finite-difference Hessian step's evaluations of ``closure``: the products go
        to ``_accumulated``, as backward()'s do; the loss at theta is returned."""
        if closure is None:
            raise RuntimeError(finite_difference.CLOSURE_MESSAGE.format(hvp=self.hvp))
        accumulated = self._new_accumulated()
        pairs = [(idx, p) for idx, p in enumerate(self._flat_params()) if p.requires_grad]
        loss = finite_difference.estimate(
            closure, [p for _, p in pairs], [idx for idx, _ in pairs], hvp=self.hvp, acc=accumulated,
            seed=self.seed, backend_for=self._backend_for,
        )
        self._accumulated = accumulated  # after the closure's zero_grad(), which drops it
        return loss

    def _new_accumulated(self) -> hutchinson.Accumulated:
        return hutchinson.Accumulated(**self._step_identity(), factor=self._hessian_scale.scale)

    def _step_identity(self) -> dict[str, int]:
        """What the next step's z depend on."""
        return dict(step=self._counter("optimizer_step"), counter=self._counter("rademacher_counter"),
                    n_samples=self.n_samples, seed=self.seed)

    def _check_accumulated(self, accumulated: hutchinson.Accumulated, hessian_step: bool = True) -> None:
        """RuntimeError unless ``accumulated`` was made for this step's z (a change of
        n_samples or seed, or a load_state_dict, since the first backward() of the step)."""
        if not (hessian_step and accumulated.belongs_to(**self._step_identity())):
            raise RuntimeError(
                "AdaHessian: the Hessian-vector products accumulated by optimizer.backward()/"
                "hessian_backward() belong to another step (n_samples or seed changed, or a state_dict "
                "was loaded, since the step's first backward): call zero_grad() and compute them again."
            )

    def _step(self) -> None:
        scale = amp.loss_scale(self, self._grad_scaler)
        group = self._distributed_group()
        hessian_step = self.hessian_due
        accumulated, self._accumulated = self._accumulated, None  # used by this step only
        entries, grads = self._gather(every_trainable=group is not None)
        self._check_shapes(entries)
        if accumulated is not None:
            self._check_accumulated(accumulated, hessian_step)
            self._refuse_mixing(grads)
        if not entries:
            return
        if self._initialises_state(entries, grads):
            for _, _, p in entries:
                if not self.state[p]:
                    self.state[p].update(step=0, exp_avg=_zeros_like_state(p), exp_hessian_diag_sq=_zeros_like_state(p))
            return
        estimate, overflow = None, None
        if hessian_step:
            estimate, overflow = hutchinson.estimate(
                [p for _, _, p in entries], grads, [idx for _, idx, _ in entries], accumulated=accumulated,
                seed=self.seed, counter=self._counter("rademacher_counter"), n_samples=self.n_samples,
                backend_for=self._backend_for, record=self._graph_record, loss_scale=scale,
                hessian_scale=self._hessian_scale,
            )
            if overflow is not None:
                self._set_counter("hessian_scale", self._hessian_scale.state_dict())
        # GradScaler's skip is decided by amp alone (single process: from the flags read
        # with the product, or GradScaler's; distributed: after the reduce, so that every
        # rank takes the same decision). Hz came out unscaled; the gradients are
        # unscaled here, in place.
        if group is None:
            if amp.skipped(scale, overflow):
                return
            amp.unscale_gradients_([g for g in grads if g is not None], scale)
        else:
            amp.unscale_gradients_([g for g in grads if g is not None], scale)
            grads, keep = distributed.average_(group, [p for _, _, p in entries], grads, estimate.tensors() if estimate else [])
            entries, grads = [entries[n] for n in keep], [grads[n] for n in keep]
            estimate = None if estimate is None else estimate.select(keep)
            if scale.found_inf is not None and amp.any_nonfinite(grads + (estimate.tensors() if estimate else [])):
                return
        if accumulated is not None and accumulated.floor:  # on the ranks' average
            hutchinson.floor_(estimate, accumulated.floor, self.n_samples)

        self._update(entries, grads, estimate)
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
            grad is None or (not grad.requires_grad and not self._graph_record.seen(idx) and not grad.any())
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

    def _check_shapes(self, entries) -> None:
        """ValueError for a parameter whose shape the averaging settings refuse, before
        the step changes anything (the state's step counts, the gradients, the product).
        Each parameter once per value of the settings: not a per-step cost."""
        settings, checked = self._shapes_checked
        if settings is not self._settings:
            settings, checked = self._shapes_checked = (self._settings, set())
        for g, flat_index, p in entries:
            if p in checked:
                continue
            averaging.rule_of(
                tuple(p.shape), average_conv_kernel=self.average_conv_kernel, spatial_averaging=self.spatial_averaging,
                block_length=self.block_length, what=f"the optimizer's parameter {flat_index} (in param group {g})",
            )
            checked.add(p)

    def _update(self, entries, grads, estimate: hutchinson.Estimate | None) -> None:
        """Bring each parameter's state to what today's settings keep, and run the
        functional core once per (param group, device): model parallel never hands one
        kernel call tensors of several devices."""
        buckets: dict[tuple[int, torch.device], list[int]] = {}
        for n, (g, _, p) in enumerate(entries):
            if self._prepare_state(p, hessian_step=estimate is not None):
                buckets.setdefault((g, p.device), []).append(n)
        for (g, device), ns in buckets.items():
            group = self.param_groups[g]
            params = [entries[n][2] for n in ns]
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            functional.adahessian(
                params, [grads[n] for n in ns], [s["exp_avg"] for s in states],
                [s["exp_hessian_diag_sq"] for s in states], [s.get("hessian") for s in states],
                [s["step"] for s in states], estimate=None if estimate is None else estimate.select(ns),
                n_samples=self.n_samples, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
                average_conv_kernel=self.average_conv_kernel, spatial_averaging=self.spatial_averaging,
                block_length=self.block_length, backend=self._backend_for(device),
            )

    def _prepare_state(self, p: Tensor, *, hessian_step: bool) -> bool:
        """Make ``p``'s state what a fresh run with today's settings keeps (D between
        Hessian steps only when update_each > 1: settings may have changed) and count the
        step; False when ``p`` has no D yet and waits for the next Hessian step."""
        state = self.state[p]
        if not hessian_step:
            if "hessian" not in state:
                return False
        else:
            if not state:
                state.update(step=0, exp_avg=_zeros_like_state(p), exp_hessian_diag_sq=_zeros_like_state(p))
            if self.update_each > 1 and "hessian" not in state:
                state["hessian"] = _zeros_like_state(p)
            elif self.update_each == 1:
                state.pop("hessian", None)
        state["step"] += 1
        return True

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

    def _release_graphs(self) -> None:
        # backward(create_graph=True) makes param -> grad -> graph -> param cycles that
        # gc cannot see through (they pass through C++); dropping the graph breaks them.
        for p in self._flat_params():
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()


def _zeros_like_state(p: Tensor) -> Tensor:
    return torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)


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


def _differs(a: Any, b: Any) -> bool:
    """Whether two setting values differ, in type too (True == 1, yet True is no update_each)."""
    return type(a) is not type(b) or a != b


def _check_same_settings(group: dict[str, Any], first: dict[str, Any]) -> None:
    """ValueError unless ``group`` holds the optimizer-wide settings of ``first``."""
    differ = [name for name in SETTINGS if _differs(group[name], first[name])]
    if differ:
        names = ", ".join(differ)
        raise ValueError(
            f"AdaHessian: the param groups disagree on {names}; {names} must be the same in every param group "
            f"(an optimizer-wide setting): set it for all groups with optimizer.{differ[0]} = value"
        )


def _validate_settings(group: dict[str, Any]) -> tuple:
    """Check the optimizer-wide settings in ``group`` (ValueError naming the bad one);
    their tuple."""
    update_each, n_samples, seed, backend = group["update_each"], group["n_samples"], group["seed"], group["backend"]
    if not (isinstance(update_each, int) and not isinstance(update_each, bool) and update_each >= 1):
        raise ValueError(f"Invalid update_each: {update_each!r} (an int >= 1)")
    if not (isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples >= 1):
        raise ValueError(f"Invalid n_samples: {n_samples!r} (an int >= 1)")
    if not isinstance(group["average_conv_kernel"], bool):
        raise ValueError(f"Invalid average_conv_kernel: {group['average_conv_kernel']!r} (a bool)")
    averaging.validate(group["average_conv_kernel"], group["spatial_averaging"], group["block_length"])
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (one of {', '.join(map(repr, BACKENDS))})")
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise ValueError(f"Invalid seed: {seed} (an int in [0, 2**32))")
    if group["hvp"] not in HVPS:
        raise ValueError(f"Invalid hvp: {group['hvp']!r} (one of {', '.join(map(repr, HVPS))})")
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
