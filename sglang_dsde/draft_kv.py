"""Where each request's draft KV cache is valid: the bookkeeping behind the aligned draft
and the free "off" state (pure torch and Python; the worker feeds it SGLang's values).

Convention (aligned draft): the draft's KV slot at position ``p`` of a request holds the
draft's keys and values of token ``p``, computed over tokens ``0 .. p``. A request is
*current* when its draft KV is valid through its pending bonus token (position ``S``, the
token the target verified last and has not written yet); its next first-draft
distribution is then the draft's output after that token. Otherwise it is *behind* from
``valid_len``: positions ``< valid_len`` are valid, ``valid_len .. S`` must be extended
(the catch-up) before the request drafts again.

A request falls behind by one token after its prefill (the bonus token has no slot yet
when the prompt is prefilled), by its whole chunk when the prefill is prefilled while the
server is off (the draft's prefill is deferred to the catch-up: a request that finishes
while off never pays it), and by one token per round the batch does not draft (the free
off: the target alone decodes, no draft forward). Rounds that draft keep it current.

Radix-cache hits: a new request reuses KV slots another request wrote, and its draft KV
there is valid only if that request's draft had written those slots. ``draft_ok`` (one
bit per KV slot, on the device) says so: set by every draft write, cleared when the
target commits a token into a slot whose request is behind (an off round). A prefill
whose prefix holds a cleared bit is behind from the first one.

Host values (``valid_len``) decide what the catch-up extends; they are updated from the
batch's host lengths, identically on every TP rank. Device values (``draft_ok``,
``slot_behind``) are updated with device ops only (no synchronisation in the round path).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from sglang_dsde.core.round_cost import catch_up_tokens

#: ``valid_len`` of a current request (valid through its pending bonus token).
CURRENT = 1 << 62


class DraftKVLedger:
    """Per-slot validity of the draft KV cache (module docstring)."""

    def __init__(self, max_slots: int, kv_slots: int, device="cpu"):
        self.device = torch.device(device)
        #: Host: positions ``< valid_len[slot]`` hold valid draft KV (``CURRENT``: all).
        self.valid_len: List[int] = [0] * int(max_slots)
        #: Device: slot is behind (its target commits leave the draft KV invalid).
        self.slot_behind = torch.ones(int(max_slots), dtype=torch.bool, device=self.device)
        #: Device: KV slot holds draft KV that belongs to the token the target holds there.
        self.draft_ok = torch.zeros(int(kv_slots), dtype=torch.bool, device=self.device)
        #: Host: tokens each slot's catch-up would extend now (0: current).
        self.gap: List[int] = [0] * int(max_slots)
        #: Host counters for ``/server_info``.
        self.catch_ups = 0
        self.catch_up_tokens = 0
        self.radix_repairs = 0
        #: Host: slots whose own prefill (a chunk of it) was deferred and that have not
        #: drafted since.
        self._deferred: set = set()

    # -- request lifetime ---------------------------------------------------------------

    def on_slots_allocated(self, slots: Sequence[int]) -> None:
        """A new request took each slot: nothing of its draft KV is valid yet."""
        for s in slots:
            self.valid_len[int(s)] = 0
            self.gap[int(s)] = 0
            self._deferred.discard(int(s))
        if len(slots):
            self.slot_behind[torch.as_tensor(list(slots), dtype=torch.int64,
                                             device=self.device)] = True

    # -- draft writes ---------------------------------------------------------------------

    def mark_written(self, locs: torch.Tensor) -> None:
        """The draft wrote its KV at these KV slots (device tensor)."""
        if locs is not None and locs.numel():
            self.draft_ok[locs.to(self.device, torch.int64)] = True

    def mark_invalid(self, locs: torch.Tensor) -> None:
        if locs is not None and locs.numel():
            self.draft_ok[locs.to(self.device, torch.int64)] = False

    # -- prefill ----------------------------------------------------------------------------

    def rows_to_check(self, slots: Sequence[int], prefix_lens: Sequence[int]) -> List[int]:
        """Batch rows whose reused prefix is not known valid (a radix hit): their
        ``draft_ok`` bits decide where the request is valid up to."""
        return [i for i, (s, m) in enumerate(zip(slots, prefix_lens))
                if m > 0 and self.valid_len[int(s)] < m]

    def first_invalid(self, req_to_token: torch.Tensor, rows: torch.Tensor,
                      prefix_lens: Sequence[int]) -> List[int]:
        """For each request (its ``req_to_token`` row and prefix length), the first
        position ``< prefix`` whose draft KV is not valid, else the prefix length. One
        device-to-host read (a prefill batch with radix hits)."""
        if not len(prefix_lens):
            return []
        width = max(int(m) for m in prefix_lens)
        if width == 0:
            return [0] * len(prefix_lens)
        prefix = torch.as_tensor(list(prefix_lens), dtype=torch.int64, device=self.device)
        locs = req_to_token[rows.to(req_to_token.device, torch.int64), :width].to(
            self.device, torch.int64)
        inside = torch.arange(width, device=self.device).unsqueeze(0) < prefix.unsqueeze(1)
        bad = inside & ~self.draft_ok[locs]
        first = torch.where(bad.any(dim=1), bad.to(torch.int8).argmax(dim=1), prefix)
        return [int(v) for v in first.tolist()]

    def after_prefill(self, slots: Sequence[int], prefix_lens: Sequence[int],
                      ends: Sequence[int], first_invalid: Optional[dict] = None,
                      extended: bool = True) -> None:
        """The draft extended each request over ``prefix .. end - 1`` (aligned). A request
        whose prefix was invalid from ``j`` (``first_invalid[row]``) is behind from ``j``.
        ``extended`` False: the draft's prefill was deferred (the server was off; the
        chunk's KV slots were cleared, ``mark_invalid``): each request stays valid only
        through its valid prefix, and its catch-up extends the rest when it drafts."""
        first_invalid = first_invalid or {}
        for row, (s, m, e) in enumerate(zip(slots, prefix_lens, ends)):
            j = first_invalid.get(row, m)
            if j < m:  # (a request's own deferred chunk is not a radix repair)
                self.radix_repairs += int(s) not in self._deferred
                self.valid_len[int(s)] = j
            elif not extended:
                self.valid_len[int(s)] = (m if row in first_invalid
                                          else min(self.valid_len[int(s)], int(m)))
            elif self.valid_len[int(s)] >= m or m == 0 or row in first_invalid:
                self.valid_len[int(s)] = int(e)
            # The pending bonus token at ``e`` (a final chunk), and any repair range.
            self.gap[int(s)] = int(e) + 1 - min(self.valid_len[int(s)], int(e))
            if not extended:
                self._deferred.add(int(s))
        if len(slots):
            self.slot_behind[torch.as_tensor(list(slots), dtype=torch.int64,
                                             device=self.device)] = True

    # -- decode rounds ----------------------------------------------------------------------

    def catch_up_prefixes(self, slots: Sequence[int], seq_lens: Sequence[int]
                          ) -> Optional[List[int]]:
        """Where each request's catch-up starts (its pending bonus token ``S`` for a
        current one), or None when every request of the batch is current."""
        starts, behind = [], False
        for s, n in zip(slots, seq_lens):
            v = self.valid_len[int(s)]
            if v <= n:
                behind = True
            starts.append(min(v, int(n)))
        return starts if behind else None

    def pending_tokens(self, slots: Sequence[int]) -> int:
        """Tokens a catch-up of this batch would extend now (0 when all are current): each
        behind request's gap, and the pending bonus token of each current one."""
        return catch_up_tokens(self.gap[int(s)] for s in slots)

    def on_drafting_round(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        """The batch drafts this round (after its catch-up): every request is current."""
        for s in slots:
            self.valid_len[int(s)] = CURRENT
            self.gap[int(s)] = 0
            self._deferred.discard(int(s))
        self.slot_behind[rows.to(self.device, torch.int64)] = False

    def on_off_round(self, slots: Sequence[int], seq_lens: Sequence[int],
                     rows: torch.Tensor, commit_locs: torch.Tensor) -> None:
        """The target alone decodes this round: it commits each request's pending bonus
        token at ``commit_locs`` (the KV slot of position ``S``). A current request is now
        valid through ``S`` only; for one already behind that slot's draft KV is invalid."""
        for s, n in zip(slots, seq_lens):
            self.gap[int(s)] += 1
            if self.valid_len[int(s)] == CURRENT:
                self.valid_len[int(s)] = int(n) + 1
        rows = rows.to(self.device, torch.int64)
        locs = commit_locs.to(self.device, torch.int64)
        behind = self.slot_behind[rows]
        self.draft_ok[locs] = self.draft_ok[locs] & ~behind
        self.slot_behind[rows] = True

    def stats(self) -> dict:
        return {"catch_ups": self.catch_ups, "catch_up_tokens": self.catch_up_tokens,
                "radix_repairs": self.radix_repairs}
