"""State-dict compatibility of :class:`adahessian.AdaHessian` on top of
``torch.optim.Optimizer``'s: dicts of earlier versions upgraded, settings and counters
a dict lacks filled in, and the state dtypes torch's loading casts restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from .precision import state_dtype
from .settings import COUNTERS, SETTINGS, initial_counter


def upgrade(state_dict: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
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
        hessian_scale=dict(saved.get("hessian_scale", initial_counter("hessian_scale"))),
    )
    groups = [{**group, **values} for group in state_dict["param_groups"]]
    return {**{k: v for k, v in state_dict.items() if k != "adahessian"}, "param_groups": groups}


@contextmanager
def loading(optimizer) -> Iterator[None]:
    """Within: ``optimizer.load_state_dict``'s run. torch casts every state tensor to its
    parameter's dtype, but m, v and D of a bfloat16/float16 parameter stay float32
    (docs/algorithm.md, section 1): ``__setstate__``, which torch calls at the end,
    reads ``optimizer._loading`` for the dict that is loaded, after every pre hook (this
    one runs last) and restores them (:func:`restore_state_dtypes`)."""
    loaded: list[dict[str, Any]] = []
    handle = optimizer.register_load_state_dict_pre_hook(lambda _, state_dict: loaded.append(state_dict))
    optimizer._loading = loaded
    try:
        yield
    finally:
        handle.remove()
        del optimizer._loading


def fill_in(param_groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    """Settings and counters that groups of an older dict lack, as a fresh run has them;
    ``defaults`` then holds the groups' settings."""
    for group in param_groups:
        for name in SETTINGS:
            group.setdefault(name, defaults[name])
        for name in COUNTERS:
            group.setdefault(name, initial_counter(name))
    defaults.update({name: param_groups[0][name] for name in SETTINGS})


def restore_state_dtypes(state: dict, params: list[Tensor], loaded: dict[str, Any]) -> None:
    """After torch's casts: ``step`` as a Python int (torch's own format stores a
    tensor), and float32 m, v and D for bfloat16/float16 parameters, from ``loaded``."""
    saved_ids = [i for group in loaded["param_groups"] for i in group["params"]]
    for saved_id, p in zip(saved_ids, params):
        param_state = state.get(p)
        if not param_state:
            continue
        if isinstance(param_state.get("step"), Tensor):
            param_state["step"] = int(param_state["step"].item())
        dtype = state_dtype(p)
        if dtype != p.dtype:
            for key, value in loaded["state"][saved_id].items():
                if isinstance(value, Tensor) and key != "step":
                    param_state[key] = value.to(device=p.device, dtype=dtype)


def initialises_state(param_groups: list[dict[str, Any]], entries, grads: list[Tensor | None], record) -> bool:
    """Is this torch.distributed.checkpoint making the state (its
    ``_init_optim_state``: one step, every lr set to 0, on zero gradients set by hand)?
    Then the step only creates the state a first step would, and counts nothing, so
    that a checkpoint of a fresh optimizer resumes as a fresh run (``entries``: the
    step's (group, flat index, parameter); ``record``: the
    :class:`adahessian.graphs.GraphRecord` that saw gradients arrive)."""
    if any(float(group["lr"]) != 0.0 for group in param_groups):
        return False
    return all(
        grad is None or (not grad.requires_grad and not record.seen(idx) and not grad.any())
        for (_, idx, _), grad in zip(entries, grads)
    )
