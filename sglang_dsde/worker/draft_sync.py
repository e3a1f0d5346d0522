"""Keeping the aligned draft's KV cache exact across prefills, off rounds and radix hits
(the worker side of ``sglang_dsde.draft_kv``; read against SGLang 0.5.23).

``DraftSync`` is owned by ``DSDEWorkerV2`` and called at three points of a round:

* after a prefill (``after_prefill``): the draft extended each chunk at its own
  positions, or (the server off: ``defer_prefill``) skipped it, leaving the request
  behind from its valid prefix; a radix hit whose reused draft KV was not all written
  by a draft (its ``draft_ok`` bits) leaves the request behind from the first such
  position;
* before a decode round (``before_decode``): a drafting round first runs one batched
  catch-up extend when a request of the batch is behind (its first drafts are then
  recorded as the policy's first-draft distributions); an off round marks the slot where
  the target commits each request's bonus token;
* on every draft write (``mark_written``, from the draft runner's wrapped forward and the
  draft-extend graph's wrapped ``execute``).

Host lengths come from ``batch.seq_lens_cpu`` when the scheduler keeps it (always without
overlap scheduling); otherwise they are read from the device on the rounds that need them
(a catch-up, or the first off round after drafting ones), never on steady rounds.
"""

from __future__ import annotations

import time
from typing import List, Optional

import torch

from sglang_dsde.draft_kv import CURRENT, DraftKVLedger


class DraftSync:
    """The ledger plus the SGLang-facing calls (module docstring)."""

    def __init__(self, worker, max_slots: int, kv_slots: int, device):
        self.worker = worker
        self.ledger = DraftKVLedger(max_slots, kv_slots, device)
        #: Seconds of the last catch-up (host clock, includes its launch only on a GPU).
        self.last_catch_up_s = 0.0
        self.last_catch_up_tokens = 0
        #: The prefill in flight skipped the draft's extend (``defer_prefill``).
        self.prefill_deferred = False
        #: Prefill batches whose draft extend was deferred (host counter).
        self.deferred_prefills = 0

    # -- hooks ---------------------------------------------------------------------------

    def on_slots_allocated(self, rows) -> None:
        self.ledger.on_slots_allocated([int(r) for r in rows])

    def mark_written(self, forward_batch) -> None:
        virtual = getattr(forward_batch, "out_cache_loc_virtual", None)
        self.ledger.mark_written(virtual if virtual is not None
                                 else forward_batch.out_cache_loc)

    # -- prefill -------------------------------------------------------------------------

    def after_prefill(self, batch) -> None:
        if batch.forward_mode.is_idle() or not batch.reqs:
            return
        slots = [int(r.kv.req_pool_idx) for r in batch.reqs]
        prefix = [int(m) for m in batch.prefix_lens]
        ends = [m + int(n) for m, n in zip(prefix, batch.extend_lens)]
        check = self.ledger.rows_to_check(slots, prefix)
        first_invalid = {}
        if check:
            rows = torch.as_tensor([slots[i] for i in check], dtype=torch.int64)
            found = self.ledger.first_invalid(
                self.worker.req_to_token_pool.req_to_token, rows, [prefix[i] for i in check])
            first_invalid = dict(zip(check, found))
        deferred = self.prefill_deferred
        self.prefill_deferred = False
        self.ledger.after_prefill(slots, prefix, ends, first_invalid, extended=not deferred)

    def defer_prefill(self, batch) -> None:
        """The draft skips this prefill's extend: the KV slots the target wrote hold no
        draft KV (bits cleared, on the device); ``after_prefill`` then leaves each request
        behind from its valid prefix."""
        self.ledger.mark_invalid(batch.out_cache_loc)
        self.prefill_deferred = True
        self.deferred_prefills += 1

    # -- decode rounds -------------------------------------------------------------------

    def before_decode(self, batch, steps: int) -> Optional[torch.Tensor]:
        """Bring the batch's draft KV up to date for a drafting round (returns the
        catch-up's first-draft logits ``[bs, V]``, or None when nothing ran), or mark the
        off round's commits."""
        slots = [int(r.kv.req_pool_idx) for r in batch.reqs]
        valid = self.ledger.valid_len
        if steps > 0:
            if all(valid[s] == CURRENT for s in slots):
                return None
            seq_lens = self._host_seq_lens(batch)
            starts = self.ledger.catch_up_prefixes(slots, seq_lens)
            logits = None
            if starts is not None:
                logits = self._catch_up(batch, starts, seq_lens)
            self.ledger.on_drafting_round(slots, batch.req_pool_indices)
            return logits
        seq_lens = (self._host_seq_lens(batch)
                    if any(valid[s] == CURRENT for s in slots) else [0] * len(slots))
        rows = batch.req_pool_indices.to(torch.int64)
        locs = self.worker.req_to_token_pool.req_to_token[rows, batch.seq_lens.to(torch.int64)]
        self.ledger.on_off_round(slots, seq_lens, rows, locs)
        return None

    def _catch_up(self, batch, starts: List[int], seq_lens: List[int]) -> torch.Tensor:
        worker = self.worker
        tic = time.perf_counter()
        worker._extend_output = None
        ret, tokens = worker._draft_worker.catch_up(batch, starts, seq_lens)
        spec = batch.spec_info
        spec.topk_p, spec.topk_index = ret.topk_p, ret.topk_index
        if ret.draft_probs is not None:
            spec.draft_probs = ret.draft_probs
        logits = worker._extend_output.next_token_logits if worker._extend_output else None
        worker._extend_output = None
        self.ledger.catch_ups += 1
        self.ledger.catch_up_tokens += tokens
        self.last_catch_up_tokens = tokens
        self.last_catch_up_s = time.perf_counter() - tic
        return logits

    @staticmethod
    def _host_seq_lens(batch) -> List[int]:
        if batch.seq_lens_cpu is not None:
            return [int(n) for n in batch.seq_lens_cpu.tolist()]
        return [int(n) for n in batch.seq_lens.tolist()]  # one read, transition rounds only

    def stats(self) -> dict:
        return {**self.ledger.stats(), "deferred_prefills": self.deferred_prefills}
