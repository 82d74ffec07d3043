"""Spatial averaging of the Hessian diagonal D (docs/algorithm.md, section 1, step 2):
which elements of a tensor share one curvature value, as a function of its shape and of
three optimizer-wide settings. The reference path averages with :func:`mean_abs`; the
fused kernels are handed each rule's ``group`` (csrc/ops.cpp, ``fused_step_``'s
``groups``), and tests/oracle.py re-derives the rules in float64.

Every rule averages |D| over *consecutive groups of the tensor's logical row-major
order*, so one group size per tensor describes it:

* ``spatial_averaging="conv2d"`` (the default): with ``average_conv_kernel=True``, a 4-D
  (Conv2d) weight's |D| over dims 2, 3 (its kh*kw positions); every other tensor, and
  everything with ``average_conv_kernel=False``, keeps D per element (Conv1d's 3-D and
  Conv3d's 5-D weights too).
* ``spatial_averaging="official"``: the rule of the official implementation's
  ``instruction/adahessian.py`` (amirgholami/adahessian), whatever
  ``average_conv_kernel`` says: 4-D over dims 2, 3; 3-D (Conv1d) over the last dim; 2-D
  over whole rows (dim 1); 0-D and 1-D per element, as |D|. 5-D and more: ValueError
  (the official code raises there too; silently leaving a Conv3d per element would
  hide that the rule does not cover it).
* ``block_length=b > 1``: the official fairseq version's ``--block-length``: |D| over
  consecutive blocks of b elements of every flattened tensor (the IWSLT transformer runs
  used 32). Every parameter's size must be a multiple of b (ValueError at step naming
  the tensor otherwise, as the official code asserts); it replaces the shape rules, so
  it combines with neither ``average_conv_kernel=True`` nor ``"official"``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

SPATIAL_AVERAGING = ("conv2d", "official")


class Rule(NamedTuple):
    """How one tensor's D is averaged: |D| over ``dims`` (a tuple of trailing dims, empty
    for |D| per element) or, with ``dims`` None, over consecutive blocks of ``group``
    elements of the flattened tensor. ``group``: the elements per group either way."""

    group: int
    dims: tuple[int, ...] | None


def validate(average_conv_kernel: bool, spatial_averaging: str, block_length: int) -> None:
    """ValueError for settings out of range or that do not combine."""
    if spatial_averaging not in SPATIAL_AVERAGING:
        raise ValueError(
            f"Invalid spatial_averaging: {spatial_averaging!r} (one of {', '.join(map(repr, SPATIAL_AVERAGING))})"
        )
    if not (isinstance(block_length, int) and not isinstance(block_length, bool) and block_length >= 1):
        raise ValueError(f"Invalid block_length: {block_length!r} (an int >= 1)")
    if block_length > 1 and (average_conv_kernel or spatial_averaging != "conv2d"):
        raise ValueError(
            f"block_length={block_length} averages every tensor over blocks and replaces the shape rules: it does "
            "not combine with average_conv_kernel=True or spatial_averaging='official' (set block_length=1, or "
            "average_conv_kernel=False and spatial_averaging='conv2d')"
        )


def rule_of(shape: tuple[int, ...], *, average_conv_kernel: bool, spatial_averaging: str, block_length: int,
            what: str = "a parameter") -> Rule | None:
    """The averaging of a tensor of ``shape`` (None: D stays per element, signed).
    ValueError where the settings refuse the shape (``what`` names the tensor)."""
    dim = len(shape)
    if block_length > 1:
        numel = math.prod(shape)
        if numel % block_length:
            raise ValueError(
                f"AdaHessian(block_length={block_length}): {what} of shape {tuple(shape)} has {numel} elements, "
                f"not a multiple of {block_length}: choose a block_length that divides every parameter's size "
                f"(e.g. {math.gcd(numel, block_length)}), or block_length=1"
            )
        return Rule(block_length, None)
    if spatial_averaging == "official":
        if dim >= 5:
            raise ValueError(
                f"AdaHessian(spatial_averaging='official'): {what} of shape {tuple(shape)} is {dim}-D; the official "
                "rule covers tensors up to 4-D (it raises too): use spatial_averaging='conv2d' (5-D weights stay "
                "per element) or block_length"
            )
        dims = {4: (2, 3), 3: (2,), 2: (1,)}.get(dim, ())
    elif average_conv_kernel and dim == 4:
        dims = (2, 3)
    else:
        return None
    return Rule(max(1, math.prod(shape[d] for d in dims)), dims)


def mean_abs(d: Tensor, rule: Rule) -> Tensor:
    """D averaged by ``rule``: each element replaced by its group's mean |D|."""
    a = d.abs()
    if rule.dims is None:
        return a.reshape(-1, rule.group).mean(dim=1, keepdim=True).expand(-1, rule.group).reshape(d.shape)
    if not rule.dims:
        return a
    return a.mean(dim=list(rule.dims), keepdim=True).expand_as(d).clone()
