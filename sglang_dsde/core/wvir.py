"""Weighted variances and WVIR (weighted variance intensity ratio), batched over requests.

Semantics (docs/algorithm.md, "Stability: WVIR"), for one request with n values in its
history:

* weight of a value: ``decay ** age`` (newest age 0, weight 1);
* ``wvar(x, w) = sum w (x - m)^2 / sum w`` with ``m = sum w x / sum w``;
* short window: the newest ``max(1, n // 3)`` values; long window: all n values;
* ``WVIR = wvar(short) / wvar(long)``; ``WVIR = 0`` if ``n < 2`` (checked first);
  ``WVIR = 20`` if ``wvar(long) < 1e-6``.

All tensors are float64 so the result agrees with a float64 reference to rounding.
"""

from __future__ import annotations

import torch

#: WVIR when the long-window variance is (numerically) zero: maximal instability.
WVIR_FLAT = 20.0
#: Long-window variance below this counts as zero.
WVAR_FLOOR = 1e-6


def decay_weights(decay: float, window: int, device: torch.device) -> torch.Tensor:
    """``[window]`` float64 table ``decay ** age``, built with Python floats (as a
    reference would compute them) and indexed by age."""
    return torch.tensor([decay ** age for age in range(window)], dtype=torch.float64,
                        device=device)


def weighted_variance(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted variance along the last dimension; zero weights exclude a value.

    A row whose weights are all zero gives NaN (0 / 0); callers mask such rows.
    """
    weight_sum = weights.sum(dim=-1, keepdim=True)
    mean = (weights * values).sum(dim=-1, keepdim=True) / weight_sum
    return ((weights * (values - mean) ** 2).sum(dim=-1, keepdim=True) / weight_sum).squeeze(-1)


def wvir(values: torch.Tensor, age: torch.Tensor, count: torch.Tensor,
         weight_by_age: torch.Tensor, *, flat_value: float = WVIR_FLAT) -> torch.Tensor:
    """``[bs]`` WVIR of ring buffers ``values [bs, W]`` whose columns have ``age``.

    ``count [bs]`` is the number of values held (columns with ``age < count`` are valid);
    ``weight_by_age`` is ``decay_weights(...)``; ``flat_value`` is the ratio of a flat
    history (the paper's 20; the goodput policy reads a flat history as stable, 1).
    """
    weights = weight_by_age[age]
    short_len = torch.clamp_min(count // 3, 1).unsqueeze(1)
    long_weights = torch.where(age < count.unsqueeze(1), weights, 0.0)
    short_weights = torch.where(age < short_len, long_weights, 0.0)
    both = weighted_variance(values.unsqueeze(1).expand(-1, 2, -1),
                             torch.stack((short_weights, long_weights), dim=1))
    var_short, var_long = both[:, 0], both[:, 1]
    ratio = torch.where(var_long < WVAR_FLOOR, flat_value, var_short / var_long)
    return torch.where(count < 2, 0.0, ratio)
