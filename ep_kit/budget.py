"""One budget unit for every method: the keep ratio ``r`` over a candidate pool of ``n`` tokens."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_ratio(ratio: float, name: str = "keep_ratio") -> float:
    """Return ``ratio`` as float, or raise naming ``name`` when it lies outside (0, 1]."""
    r = float(ratio)
    if not (0.0 < r <= 1.0) or math.isnan(r):
        raise ValueError(f"{name} must be in (0, 1], got {ratio!r}")
    return r


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept from a pool of ``n``: ``min(n, max(1, ceil(r * n)))``, and 0 for an empty pool.

    ``ceil`` is taken on ``r * n`` rounded to 9 decimals so that e.g. ``0.1 * 30`` counts 3, not 4.
    """
    r = check_ratio(ratio)
    if n < 0:
        raise ValueError(f"pool size must be >= 0, got {n}")
    if n == 0:
        return 0
    return min(n, max(1, math.ceil(round(r * n, 9))))


def keep_counts(n: Tensor, ratio: float) -> Tensor:
    """Vectorised :func:`keep_count` over a ``(B,)`` long tensor of pool sizes."""
    r = check_ratio(ratio)
    k = torch.ceil(torch.round(n.double() * r, decimals=9)).long()
    k = torch.maximum(k, torch.ones_like(k))
    return torch.where(n > 0, torch.minimum(k, n), torch.zeros_like(n))
