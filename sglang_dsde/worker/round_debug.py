"""Per-server diagnostics of DSDE's decode rounds (``/server_info`` and, on request,
``meta_info``).

Always: ``first_draft_misses`` (request-rounds that drafted and whose first draft token
the target rejected) over ``drafted_request_rounds``. With the draft model as its own
target and greedy decoding this is 0 when the draft sees every token at its own position
(docs/standalone-alignment.md); counted on the device, read only when ``/server_info``
asks.

Two switches from the environment of the server process, for tests and diagnostics:

* ``SGLANG_DSDE_STEP_PATTERN="3,3,0,0"``: the batch's step count, round by round, cycles
  through this list instead of the policy's decision (clamped into the server's
  ``[min_steps, max_steps]``), to force off/on cycles;
* ``SGLANG_DSDE_TRACE_FIRST_DRAFT=1``: each request's ``meta_info`` gets
  ``dsde_first_draft``, one row per decode round: ``[S, steps, accept length,
  log-probabilities of the round's first-draft distribution ...]`` (``S``: the committed
  length, so the distribution follows tokens ``0 .. S``; NaN log-probabilities in a round
  that did not draft). A vocabulary-sized row per request and round: for small models.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch


class _HostRows:
    """Rows of a ``[bs, n]`` tensor, read on the host at first access (after the
    scheduler's device-to-host fence, like the worker's other per-request values)."""

    def __init__(self, rows: torch.Tensor):
        self._device = rows.detach().to("cpu", non_blocking=True)
        self._host: Optional[list] = None

    def __getitem__(self, index: int) -> List[Optional[float]]:
        if self._host is None:
            self._host = [[None if v != v else v for v in row]
                          for row in self._device.tolist()]
        return self._host[index]


class RoundDebug:
    """First-draft counters plus the two environment switches (module docstring)."""

    def __init__(self, pattern: Optional[List[int]] = None, trace: bool = False):
        self.pattern = pattern
        self.trace = trace
        self._round = 0
        self._misses: Optional[torch.Tensor] = None
        self.drafted_request_rounds = 0

    @classmethod
    def from_env(cls) -> "RoundDebug":
        text = os.environ.get("SGLANG_DSDE_STEP_PATTERN", "").strip()
        pattern = [int(v) for v in text.split(",") if v.strip()] if text else None
        trace = os.environ.get("SGLANG_DSDE_TRACE_FIRST_DRAFT", "") not in ("", "0")
        return cls(pattern, trace)

    def steps(self, decided: int, lo: int = 0, hi: int = 1 << 30) -> int:
        """The round's step count: the policy's, or the pattern's next value."""
        if not self.pattern:
            return decided
        value = self.pattern[self._round % len(self.pattern)]
        self._round += 1
        return min(max(value, lo), hi)

    def after_round(self, worker, batch, result, steps: int) -> None:
        accept = result.accept_lens
        if accept is None:
            return
        bs = int(accept.shape[0])
        if steps > 0:
            miss = (accept == 1).sum()
            self._misses = miss if self._misses is None else self._misses + miss
            self.drafted_request_rounds += bs
        info = result.logits_output.customized_info if result.logits_output else None
        if not self.trace or info is None:
            return
        if steps > 0:
            first = worker.dsde.round_draft_logits(bs, steps)[:, 0].double()
            logprobs = torch.log_softmax(first, dim=-1)
        else:
            logprobs = torch.full((bs, worker.dsde.vocab_size), float("nan"),
                                  dtype=torch.float64, device=accept.device)
        head = torch.stack([batch.seq_lens.double(), torch.full_like(
            accept, steps, dtype=torch.float64), accept.double()], dim=1)
        info["dsde_first_draft"] = _HostRows(torch.cat([head, logprobs.to(head.device)], 1))

    def stats(self) -> dict:
        misses = 0 if self._misses is None else int(self._misses)
        return {"first_draft_misses": misses,
                "drafted_request_rounds": self.drafted_request_rounds}
