"""The optimizer-wide settings and counters (README, "Where settings and counters
live"): kept in ``defaults`` and in every param group (as torch keeps ``foreach`` and
``fused``), equal in all, read and changed through the optimizer's attributes of the
same names. Validated here, and turned once per value into the strategies that value
chooses (:class:`Plan`): the Hessian-vector-product provider, the implementation per
device and the averaging rules.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import amp, averaging, backends, finite_difference, hutchinson

# Settings that shape D: a change of one makes the next step a Hessian step.
SHAPE_D = ("update_each", "n_samples", "average_conv_kernel", "spatial_averaging", "block_length")
SETTINGS = (*SHAPE_D, "backend", "seed", "hvp")
# Optimizer-level counters, also in every param group (plain ints and a dict of them):
# steps taken, the step from which Hessian steps are counted (the last change of a
# setting that shapes D), Rademacher vectors drawn per parameter so far (the sampler's
# `counter`), and the record of the Hessian-vector product's loss-scale factor.
COUNTERS = ("optimizer_step", "hessian_origin", "rademacher_counter", "hessian_scale")
# The provider of each value of the `hvp` setting.
PROVIDERS = {"autograd": lambda _: hutchinson.Autograd(),
             **{name: finite_difference.FiniteDifference for name in finite_difference.SCHEMES}}
HVPS = tuple(PROVIDERS)


def setting(name: str, doc: str) -> property:
    """The optimizer attribute ``name``: read from the first param group (``defaults``
    while there is none), written into ``defaults`` and every group."""

    def get(self) -> Any:
        return (self.param_groups[0] if self.param_groups else self.defaults)[name]

    def set_(self, value: Any) -> None:
        self.defaults[name] = value
        for group in self.param_groups:
            group[name] = value

    return property(get, set_, doc=doc)


class Plan:
    """What one value of the settings chooses, built once per value: ``hvp`` (the
    provider: :class:`adahessian.hutchinson.Autograd` or
    :class:`adahessian.finite_difference.FiniteDifference`), ``implementations`` (per
    device, :class:`adahessian.backends.Implementations`, kept from ``previous`` for the
    same ``backend``: each device is resolved, and "auto" warns, once) and
    ``averaging``; ``values`` are the settings in :data:`SETTINGS` order, validated."""

    def __init__(self, values: tuple, previous: Plan | None = None) -> None:
        named = dict(zip(SETTINGS, values))
        self.values = values
        self.update_each, self.n_samples, self.seed = named["update_each"], named["n_samples"], named["seed"]
        self.averaging = averaging.Averaging(named["average_conv_kernel"], named["spatial_averaging"],
                                             named["block_length"])
        same_backend = previous is not None and not differs(previous.implementations.requested, named["backend"])
        self.implementations = previous.implementations if same_backend else backends.Implementations(named["backend"])
        self.hvp = PROVIDERS[named["hvp"]](named["hvp"])
        self._checked: set[int] = set()  # ids of the parameters check_shapes passed

    def check_shapes(self, entries) -> None:
        """ValueError for a parameter whose shape the averaging settings refuse, before
        the step changes anything (the state's step counts, the gradients, the product);
        ``entries``: the step's (param group, flat index, parameter). Each parameter once
        per plan, by id (a parameter stays in its group, alive): not a per-step cost."""
        for g, flat_index, p in entries:
            if id(p) not in self._checked:
                self.averaging.rule(p.shape, what=f"the optimizer's parameter {flat_index} (in param group {g})")
                self._checked.add(id(p))


def plan_of(group: dict[str, Any], previous: Plan | None = None) -> Plan:
    """The plan of the settings in ``group`` (ValueError naming a bad one)."""
    return Plan(validate_settings(group), previous)


def resync(param_groups: list[dict[str, Any]], plan: Plan) -> tuple[Plan, bool]:
    """The plan of the settings the param groups hold now (``plan`` itself when they are
    its values) and whether a setting that shapes D changed; nothing is changed.
    ValueError for a bad value or groups that disagree."""
    first = param_groups[0]
    for group in param_groups[1:]:
        check_same_settings(group, first)
    values = tuple(first[name] for name in SETTINGS)
    if not any(map(differs, values, plan.values)):
        return plan, False
    shapes_d = any(map(differs, values[: len(SHAPE_D)], plan.values[: len(SHAPE_D)]))
    return plan_of(first, plan), shapes_d


def initial_counter(name: str) -> Any:
    return amp.HessianScale().state_dict() if name == "hessian_scale" else 0


def differs(a: Any, b: Any) -> bool:
    """Whether two setting values differ, in type too (True == 1, yet True is no update_each)."""
    return type(a) is not type(b) or a != b


def check_same_settings(group: dict[str, Any], first: dict[str, Any]) -> None:
    """ValueError unless ``group`` holds the optimizer-wide settings of ``first``."""
    differ = [name for name in SETTINGS if differs(group[name], first[name])]
    if differ:
        names = ", ".join(differ)
        raise ValueError(
            f"AdaHessian: the param groups disagree on {names}; {names} must be the same in every param group "
            f"(an optimizer-wide setting): set it for all groups with optimizer.{differ[0]} = value"
        )


def validate_settings(group: dict[str, Any]) -> tuple:
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
    if backend not in backends.BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (one of {', '.join(map(repr, backends.BACKENDS))})")
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise ValueError(f"Invalid seed: {seed} (an int in [0, 2**32))")
    if group["hvp"] not in PROVIDERS:
        raise ValueError(f"Invalid hvp: {group['hvp']!r} (one of {', '.join(map(repr, HVPS))})")
    return tuple(group[name] for name in SETTINGS)


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """The original's rules for the per-group hyperparameters (ValueError, stating the
    rule), plus weight_decay; ``lr`` a Python number or, as torch.optim takes it, a
    1-element real tensor (on any device: its value is read on the host, here and once
    per step)."""
    lr, eps, betas, hessian_power = group["lr"], group["eps"], group["betas"], group["hessian_power"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(
                f"Invalid learning rate: a tensor of shape {tuple(lr.shape)} and dtype {lr.dtype}; a tensor lr "
                "holds one real number (a 1-element floating-point tensor), or pass a Python float"
            )
        lr = lr.item()
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (a number >= 0)")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']} (a number >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (a number >= 0; 1e-4 is stable on small CNNs and transformers)")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (in [0, 1))")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]} (in [0, 1))")
    if not 0.0 <= hessian_power <= 1.0:
        raise ValueError(f"Invalid Hessian power value: {hessian_power} (in [0, 1])")
