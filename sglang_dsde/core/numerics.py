"""Batched scalar rules shared by the policies, written to match the reference semantics.

The replay is checked against a plain-Python float64 reference, so the few places where
floating-point detail decides an integer are spelled out here once:

* ``round`` is Python's (half to even): ``torch.round`` rounds half to even as well.
* ``ceil`` of a value within ``CEIL_TOLERANCE`` of an integer is that integer, so that a
  mean such as ``(2 + 3 + 4) / 3`` or ``0.1 * 10`` never ceils one too high.
* A sum that decides a tie (the warm-up mean KL in the upper bound) is accumulated with
  Neumaier's compensated summation, value by value in arrival order: bit for bit what
  Python 3.12+ ``sum()`` returns for the same list, and (nearly always) the correctly
  rounded sum, i.e. what ``math.fsum`` or ``statistics.fmean`` would give.

Every function is element-wise over tensors and performs no host synchronisation.
"""

from __future__ import annotations

import torch

#: ``ceil(x)`` is ``round(x)`` when ``|x - round(x)| <= CEIL_TOLERANCE`` (docs/algorithm.md).
CEIL_TOLERANCE = 1e-9


def ceil_tol(x: torch.Tensor) -> torch.Tensor:
    """``ceil`` that snaps values within 1e-9 of an integer to it (same dtype as ``x``)."""
    nearest = torch.round(x)
    return torch.where((x - nearest).abs() <= CEIL_TOLERANCE, nearest, torch.ceil(x))


def neumaier_add_columns(total: torch.Tensor, comp: torch.Tensor,
                         values: torch.Tensor) -> tuple:
    """Add ``values[:, j]`` for j = 0, 1, ... to running sums ``(total, comp)``, in order.

    ``total`` and ``comp`` are ``[bs]`` (the running sum and its compensation, both
    starting at 0.0); ``values`` is ``[bs, P]``; zeros add exactly nothing, so callers mask
    by zeroing. Returns the new ``(total, comp)``; the sum is ``total + comp``. The loop is
    over the (few) positions, never over requests.
    """
    for j in range(values.shape[1]):
        x = values[:, j]
        t = total + x
        # Neumaier: the compensation recovers the low bits lost by the larger addend.
        comp = comp + torch.where(total.abs() >= x.abs(), (total - t) + x, (x - t) + total)
        total = t
    return total, comp
