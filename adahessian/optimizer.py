"""``AdaHessian``: torch's optimizer contract (as ``torch.optim.Adam``): it validates,
gathers tensor lists, keeps state and hands off once per step. Where Hz comes from, how
the work is distributed and which implementation runs are objects chosen when the
settings change (:mod:`adahessian.settings`, :mod:`adahessian.distributed`); the math
is the functional core's (:mod:`adahessian.functional`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import accumulation, amp, distributed, functional, graphs, settings, state_dicts
from .accumulation import SUB_BATCH_FLOOR, Draw
from .distributed import StepLists
from .precision import state_dtype

__all__ = ["AdaHessian", "SUB_BATCH_FLOOR"]

COMPLEX_MESSAGE = (
    "AdaHessian does not support complex parameters (the Hessian diagonal of a real loss in complex "
    "variables is not what its update assumes); optimize torch.view_as_real(param) instead."
)
SPARSE_MESSAGE = (
    "AdaHessian does not support sparse gradients: the Hessian-vector product needs a dense gradient "
    "graph (use a dense nn.Embedding, sparse=False)."
)


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

    update_each = settings.setting("update_each", "Recompute the Hessian diagonal every this many steps (int >= 1).")
    n_samples = settings.setting("n_samples", "Rademacher vectors averaged per Hessian estimate (int >= 1).")
    average_conv_kernel = settings.setting("average_conv_kernel", "Average |D| over each conv kernel's spatial positions.")
    spatial_averaging = settings.setting("spatial_averaging", '"conv2d" or "official" (adahessian/averaging.py).')
    block_length = settings.setting("block_length", "Average |D| over blocks of this many elements (1: no blocks).")
    backend = settings.setting("backend", '"auto", "fused" or "reference" (README, "Backends").')
    seed = settings.setting("seed", "Seed of the counter-based Rademacher sampler, in [0, 2**32).")
    hvp = settings.setting("hvp", '"autograd", "finite_difference" or "central_difference" (README, "Without double backward").')

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
        settings.validate_hyperparameters(defaults)
        self._plan = settings.plan_of(defaults)
        self._init_runtime(process_group)
        super().__init__(params, defaults)

    def _init_runtime(self, process_group: Any) -> None:
        """What the optimizer keeps besides `defaults`, `state`, `param_groups` and the
        settings' plan: made anew by the constructor, and by unpickling and deepcopy
        (which save none of it)."""
        self._process_group = process_group  # a ProcessGroup, "world" (the default group) or None
        self._distributor = None  # chosen (and the ranks checked) at the next step
        self._hessian_scale = amp.HessianScale()
        self._grad_scaler = None
        self._graph_record = graphs.GraphRecord()
        self._graph_record.bind(self)
        self._accumulator = accumulation.Accumulator(self._graph_record)

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
        plan, shapes_d = settings.resync(self.param_groups, self._plan)
        step = self._counter("optimizer_step")
        return (step - (step if shapes_d else self._counter("hessian_origin"))) % plan.update_each == 0

    @property
    def process_group(self) -> Any:
        """``None``, ``"world"`` or the ``torch.distributed`` process group whose ranks'
        gradients and Hessian estimates are averaged; a new value takes effect (and is
        checked across ranks) at the next step."""
        return self._process_group

    @process_group.setter
    def process_group(self, value: Any) -> None:
        self._process_group, self._distributor = value, None

    @property
    def resolved_backend(self) -> str:
        """The implementation the next step runs on these parameters, as ``backend``
        resolves it for their device: ``"fused"`` (the compiled kernels) or
        ``"reference"`` (the pure-PyTorch path; ``backend="auto"`` falls back to it, with
        one warning, where the kernels are unavailable); with parameters on several
        devices that differ, each device's ("fused on cuda:0, reference on cpu").
        Read-only; also shown by ``repr(optimizer)``. Raises as ``step()`` would:
        ValueError for a bad setting, RuntimeError for ``backend="fused"`` where the
        kernels are unavailable."""
        plan = settings.resync(self.param_groups, self._plan)[0]
        return plan.implementations.describe(dict.fromkeys(p.device for p in self._flat_params()))

    def __repr__(self) -> str:
        try:
            resolved = self.resolved_backend
        except (ValueError, RuntimeError) as err:
            resolved = f"none ({err})"
        return f"{super().__repr__()[:-1]}resolved_backend: {resolved}\n)"

    @property
    def distributor(self) -> distributed.SingleProcess | distributed.DataParallel | None:
        """How the last step was distributed (None before the first step, and after a
        change of ``process_group`` or of a setting until the next): a
        :class:`~adahessian.distributed.SingleProcess` or
        :class:`~adahessian.distributed.DataParallel`, whose ``last_average_seconds``
        times the step's averaging across ranks."""
        return self._distributor

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
        params = param_group["params"]  # a set: torch's own check refuses it, with its message
        params = param_group["params"] = (
            [params] if isinstance(params, Tensor) else params if isinstance(params, set) else list(params))
        group = {**self.defaults, **param_group}
        settings.validate_hyperparameters(group)
        plan = settings.resync([group], self._plan)[0]  # ValueError for a bad setting
        if self.param_groups:
            settings.check_same_settings(group, self.param_groups[0])
        for p in params if isinstance(params, list) else ():
            if torch.is_tensor(p) and p.is_complex():
                raise RuntimeError(COMPLEX_MESSAGE)
            if torch.is_tensor(p) and p.device.type != "meta":
                plan.implementations.on(p.device)  # backend="fused" fails here, not at step()
        for name in settings.COUNTERS:
            param_group[name] = settings.initial_counter(name) if not self.param_groups else copy.deepcopy(self._counter(name))
        first = len(self._flat_params())
        super().add_param_group(param_group)
        self._plan = plan if len(self.param_groups) == 1 else self._plan
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
        self._backward(loss, floor=None)

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
        self._backward(loss, floor=accumulation.checked_floor(floor))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's; also drops the Hessian-vector products accumulated by
        :meth:`backward` and :meth:`hessian_backward` since the last step."""
        super().zero_grad(set_to_none)
        self._accumulator.take()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step. ``closure`` re-evaluates the model: it
        zeroes the gradients, computes the loss, calls ``backward(create_graph=...)``
        (a plain ``backward()`` with ``hvp="finite_difference"``/``"central_difference"``,
        whose Hessian steps need it: they evaluate it again at perturbed parameters)
        and returns the loss, which ``step`` returns (at the unperturbed parameters)."""
        try:
            plan = self._sync()
            plan.hvp.check_scaler(getattr(self, "found_inf", None) is not None or self._grad_scaler is not None)
            hessian_step = self.hessian_due
            loss, differences = plan.hvp.evaluate(closure, self._trainable() if hessian_step else None,
                                                  hessian_step=hessian_step, draw=self._draw(),
                                                  factor=self._hessian_scale.scale, implementations=plan.implementations)
            accumulated = self._accumulator.take() if differences is None else differences
            self._advance(plan, hessian_step, accumulated)
        finally:
            self._accumulator.take()
            accumulation.release_graphs(self._flat_params())
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's. The settings and counters saved in the param groups win over
        the constructor's; a state dict saved by an earlier version (counters under a
        top-level "adahessian" key) loads too."""
        with state_dicts.loading(self):
            super().load_state_dict(state_dicts.upgrade(state_dict, self.defaults))

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
        unpickled = "_accumulator" not in self.__dict__
        super().__setstate__(state)
        state_dicts.fill_in(self.param_groups, self.defaults)
        if unpickled:
            self._init_runtime(process_group)
            for i, p in enumerate(self._flat_params()):
                self._graph_record.watch(i, p)
        if self.__dict__.get("_loading"):
            state_dicts.restore_state_dtypes(self.state, self._flat_params(), self._loading[-1])
        self._hessian_scale.load_state_dict(self._counter("hessian_scale"))
        self._plan = settings.plan_of(self.param_groups[0], self.__dict__.get("_plan"))
        self._distributor = None  # re-check that the ranks agree on the loaded counters

    # ------------------------------------------------------------------ internals

    def _advance(self, plan: settings.Plan, hessian_step: bool, accumulated: accumulation.Accumulated | None) -> None:
        """The step after the closure's evaluation: gather, estimate, settle, update, count."""
        scale = amp.loss_scale(self, self._grad_scaler)
        distributor = self._checked_distributor()
        entries, grads = self._gather(every_trainable=distributor.every_trainable)
        plan.check_shapes(entries)
        if accumulated is not None:
            accumulation.check_draw(accumulated, self._draw() if hessian_step else None)
            accumulation.refuse_mixing(grads)
        if not entries:
            return
        if state_dicts.initialises_state(self.param_groups, entries, grads, self._graph_record):
            for _, _, p in entries:
                self.state[p] = self.state[p] or _new_state(p)
            return
        estimate, overflow = None, None
        if hessian_step:
            estimate, overflow = plan.hvp.estimate(
                [p for _, _, p in entries], grads, [idx for _, idx, _ in entries], accumulated=accumulated,
                draw=self._draw(), implementations=plan.implementations, record=self._graph_record,
                loss_scale=scale, hessian_scale=self._hessian_scale,
            )
            if overflow is not None:
                self._set_counter("hessian_scale", self._hessian_scale.state_dict())
        lists = amp.settle_(scale, overflow, StepLists(entries, grads, estimate), distributor)
        if lists is None:
            return
        if accumulated is not None and accumulated.floor:  # on the ranks' average
            accumulation.floor_(lists.estimate, accumulated.floor, plan.n_samples)
        self._update(plan, lists)
        self._set_counter("optimizer_step", self._counter("optimizer_step") + 1)
        if hessian_step:
            self._set_counter("rademacher_counter", self._counter("rademacher_counter") + plan.n_samples)

    def _backward(self, loss: Tensor, *, floor: float | None) -> None:
        """backward() (``floor`` None) and hessian_backward()."""
        accumulation.check_loss(loss, "backward" if floor is None else "hessian_backward")
        plan = self._sync()
        plan.hvp.backward(self._accumulator, loss, self._trainable(), hessian_step=self.hessian_due,
                          draw=self._draw(), factor=self._hessian_scale.scale, implementations=plan.implementations,
                          floor=floor)

    def _sync(self) -> settings.Plan:
        """The plan of today's settings, made when they changed since the last look
        (ValueError: a bad value, or groups that disagree); a change of one that shapes
        D restarts the count of Hessian steps here."""
        plan, shapes_d = settings.resync(self.param_groups, self._plan)
        if plan is not self._plan:
            self._plan, self._distributor = plan, None  # the ranks must agree on the new values
            if shapes_d:
                self._set_counter("hessian_origin", self._counter("optimizer_step"))
        return plan

    def _checked_distributor(self) -> distributed.SingleProcess | distributed.DataParallel:
        """The distributor of ``process_group``, chosen at the first step after a change
        of it or of the settings, when the ranks are checked to agree."""
        if self._distributor is None:
            self._distributor = distributed.distributor_for(self.process_group, self._draw(), self.update_each,
                                                            self._flat_params())
        return self._distributor

    def _draw(self) -> Draw:
        """What the next step's z depend on."""
        return Draw(self._counter("optimizer_step"), self._counter("rademacher_counter"), self.n_samples, self.seed)

    def _gather(self, every_trainable: bool) -> tuple[list[tuple[int, int, Tensor]], list[Tensor | None]]:
        """(group index, flat parameter index, parameter) of every parameter with a
        gradient (``every_trainable``: of every one that requires grad, None where it has
        no gradient), and the gradients."""
        entries, grads = [], []
        flat_index = 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                grad = p.grad
                if grad is not None and grad.is_sparse:
                    raise RuntimeError(SPARSE_MESSAGE)
                if grad is not None or (every_trainable and p.requires_grad):
                    entries.append((g, flat_index, p))
                    grads.append(grad)
                flat_index += 1
        return entries, grads

    def _update(self, plan: settings.Plan, lists: StepLists) -> None:
        """Bring each parameter's state to what today's settings keep, and run the
        functional core once per (param group, device): model parallel never hands one
        kernel call tensors of several devices."""
        buckets: dict[tuple[int, torch.device], list[int]] = {}
        hessian_step = lists.estimate is not None
        prepared = [self._prepare_state(p, plan, hessian_step=hessian_step) for _, _, p in lists.entries]
        for n, (g, _, p) in enumerate(lists.entries):
            if prepared[n] is not None:
                buckets.setdefault((g, p.device), []).append(n)
        for (g, device), ns in buckets.items():
            group = self.param_groups[g]
            params, states = [lists.entries[n][2] for n in ns], [prepared[n] for n in ns]
            beta1, beta2 = group["betas"]
            functional.adahessian(
                params, [lists.grads[n] for n in ns], [s["exp_avg"] for s in states],
                [s["exp_hessian_diag_sq"] for s in states], [s.get("hessian") for s in states],
                [s["step"] for s in states], estimate=lists.estimate.select(ns) if hessian_step else None,
                n_samples=plan.n_samples, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
                **plan.averaging._asdict(), backend=plan.implementations.on(device),
            )

    def _prepare_state(self, p: Tensor, plan: settings.Plan, *, hessian_step: bool) -> dict[str, Any] | None:
        """Make ``p``'s state what a fresh run with today's settings keeps (D between
        Hessian steps only when update_each > 1: settings may have changed) and count the
        step; its state, or None when ``p`` has no D yet and waits for the next Hessian step."""
        state = self.state[p]
        if not hessian_step:
            if "hessian" not in state:
                return None
        else:
            if not state:
                state.update(_new_state(p))
            if plan.update_each > 1 and "hessian" not in state:
                state["hessian"] = _zeros_like_state(p)
            elif plan.update_each == 1:
                state.pop("hessian", None)
        state["step"] += 1
        return state

    def _trainable(self) -> tuple[list[Tensor], list[int]]:
        """The parameters that require grad, and their flat indices (the sampler's)."""
        flat = self._flat_params()
        return [p for p in flat if p.requires_grad], [idx for idx, p in enumerate(flat) if p.requires_grad]

    def _flat_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _counter(self, name: str) -> Any:
        return self.param_groups[0][name]

    def _set_counter(self, name: str, value: Any) -> None:
        for group in self.param_groups:
            group[name] = copy.deepcopy(value) if isinstance(value, dict) else value


def _new_state(p: Tensor) -> dict[str, Any]:
    """A parameter's state before its first step."""
    return dict(step=0, exp_avg=_zeros_like_state(p), exp_hessian_diag_sq=_zeros_like_state(p))


def _zeros_like_state(p: Tensor) -> Tensor:
    return torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
