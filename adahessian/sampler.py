"""The pinned counter-based Rademacher sampler (docs/algorithm.md, section 2).

z depends only on (seed, parameter index, counter, logical element index), so every
backend, every device and every rank of a distributed job draws the same vector
without sharing a generator, and a resumed run continues exactly.

The per-tensor key is computed here, on the host, once per tensor; the per-element
hash runs in int64 tensor ops (the reference path) or in the compiled kernels, which
take the same keys.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
# Elements hashed per chunk: bounds the int64 temporaries of a huge parameter.
_CHUNK = 1 << 22


def fmix32(x: int) -> int:
    """MurmurHash3's 32-bit finaliser on a Python int."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _C1) & MASK32
    x ^= x >> 13
    x = (x * _C2) & MASK32
    x ^= x >> 16
    return x


def rademacher_key(seed: int, param_index: int, counter: int) -> int:
    """Key of one parameter's vector number ``counter`` (all on the host)."""
    k = fmix32(seed ^ GOLDEN)
    k = fmix32(k ^ (param_index & MASK32))
    return fmix32(k ^ (counter & MASK32))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x < 2**32 and c < 2**32: split c into 16-bit halves so no int64 product overflows.
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _fmix32_tensor(x: torch.Tensor) -> torch.Tensor:
    # Every operand is in [0, 2**32), so int64 ">>" behaves as a logical shift.
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def rademacher_signs(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 tensor of +1/-1 for logical indices ``start .. start + count - 1``."""
    i = torch.arange(start, start + count, dtype=torch.int64, device=device)
    base = _fmix32_tensor((i >> 32) ^ key)
    h = _fmix32_tensor((_mul32(i & MASK32, GOLDEN) + base) & MASK32)
    return 1 - 2 * (h & 1)


def rademacher(
    shape: torch.Size | tuple[int, ...],
    key: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A contiguous tensor of +1/-1 of ``shape``: element ``i`` in row-major order
    gets the pinned hash of ``(key, i)``, whatever the parameter's memory layout."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        count = min(_CHUNK, flat.numel() - start)
        flat[start : start + count] = rademacher_signs(key, start, count, device)
    return out
