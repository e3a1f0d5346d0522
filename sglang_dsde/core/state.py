"""Slot-indexed per-request KL history: a ring buffer of the last W values on the device.

A *slot* is an integer in ``[0, max_slots)`` that names one live request (in SGLang its
``req_pool_indices`` entry). Every per-request quantity is a row of a device tensor
indexed by slot, so a whole batch is read, updated and written with one gather and one
scatter: no Python loop over requests, no host synchronisation. The slots of one batch
must be distinct. A slot must be reset (``reset``) before it is reused by a new request.

Layout: ``values[slot, c]`` for ``c < W`` is the ring; the value seen t-th (t = 0, 1, ...)
lives in column ``t % W``. Column W is a write-off column: positions that are not
written (not drafted, or pushed out by later values of the same round) are scattered
there, which keeps the scatter free of data-dependent shapes.
"""

from __future__ import annotations

import torch


class KLHistory:
    """Ring buffer of the newest ``window`` KL values per slot (float64) and ``n_seen``."""

    def __init__(self, max_slots: int, window: int, device: torch.device) -> None:
        self.window = int(window)
        self.values = torch.zeros(max_slots, self.window + 1, dtype=torch.float64,
                                  device=device)
        #: KL values seen so far per slot (counted in drafted tokens, not rounds).
        self.n_seen = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self._cols = torch.arange(self.window, device=device)

    def reset(self, slots: torch.Tensor) -> None:
        self.values[slots] = 0.0
        self.n_seen[slots] = 0

    def append(self, slots: torch.Tensor, req_kl: torch.Tensor,
               req_num_drafted: torch.Tensor) -> torch.Tensor:
        """Append ``req_kl[i, :req_num_drafted[i]]`` to each slot's ring, in order.

        ``req_kl`` is ``[bs, P]`` float64. Returns the new ``n_seen`` of the batch.
        """
        num_pos = req_kl.shape[1]
        pos = torch.arange(num_pos, device=req_kl.device).unsqueeze(0)
        drafted = req_num_drafted.unsqueeze(1)
        prev_seen = self.n_seen[slots]
        # Only the last W values of a round survive; writing only those keeps the ring
        # columns of one row distinct, so the scatter is deterministic.
        kept = (pos < drafted) & (pos >= drafted - self.window)
        cols = torch.where(kept, (prev_seen.unsqueeze(1) + pos) % self.window, self.window)
        rows = self.values[slots]
        rows.scatter_(1, cols, req_kl)
        self.values[slots] = rows
        new_seen = prev_seen + req_num_drafted
        self.n_seen[slots] = new_seen
        return new_seen

    def ages(self, req_seen: torch.Tensor) -> tuple:
        """``(age [bs, W], count [bs])`` for the batch whose ``n_seen`` is ``req_seen``.

        ``age[i, c]`` is the age of ring column c (0 = newest); a column holds a value
        only where ``age < count``, ``count = min(n_seen, W)``.
        """
        newest_col = (req_seen - 1).unsqueeze(1)
        age = (newest_col - self._cols.unsqueeze(0)) % self.window
        return age, req_seen.clamp_max(self.window)
