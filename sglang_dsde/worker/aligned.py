"""``DSDEDraftWorker``: STANDALONE's draft worker with the draft seeing each token at its
own position (read against SGLang 0.5.23).

SGLang's STANDALONE path reuses EAGLE's draft inputs, shifted by one (right for an EAGLE
head, which pairs the target's hidden state at ``p`` with token ``p + 1``): the prefill
draft extend feeds ``input_ids[1:] + [next token]`` and the decode draft extend feeds
token ``p + 1`` at KV slot ``p``. A plain LM draft then never sees the sequence's first
token, and with the radix cache reads another request's token at the last cached slot
(docs/standalone-alignment.md). DSDE's draft sees the sequence as it is:

* invariant: at the start of a decode round of committed length ``S`` (the pending bonus
  token ``b`` at position ``S``), a *current* request's draft KV slot ``p`` holds token
  ``p`` for ``p <= S``, and its first draft comes from the draft's output after ``b``;
* draft loop: draft token ``i + 1`` goes to slot and position ``S + 1 + i`` (SGLang's loop
  with ``seq_lens`` one larger): :meth:`DSDEDraftWorker.align_draft_batch` shifts the
  draft ``ForwardBatch`` where it is consumed (the multi-step attention backend's
  ``init_forward_metadata`` and the draft CUDA graph's ``execute``, wrapped per runtime
  state by :func:`wrap_draft_state`: both only copy these values, so no graph changes);
* decode draft extend: the same call as SGLang's with its window moved one slot up, to
  ``S + 1 .. S + k + 1``: after ``a`` accepted drafts, rows ``0 .. a`` are the accepted
  drafts and the new bonus token, each at its own position, and row ``a`` (SGLang's
  ``select_index``) is the next first draft. Same shapes as SGLang's (``bs * (k + 1)``
  tokens), so the draft-extend CUDA graphs are SGLang's own; the extra slot past the
  verify window is reserved (``DSDESpecAlgo`` widens the per-decode reservation by one);
* prefill draft extend: the chunk's tokens at their own slots, no rotation (so no
  next-prompt-token tail for chunked prefill). The bonus token has no slot yet, so the
  request leaves prefill one token behind. While the server is off the extend is
  deferred (``DSDEWorkerV2.defer_draft_prefill``): the request leaves prefill behind
  from its valid prefix and its catch-up extends the prompt when it first drafts;
* catch-up (:meth:`DSDEDraftWorker.catch_up`): one draft extend over each request's
  positions from where its draft KV stops being valid through its pending bonus token,
  batched over the whole batch (a current request re-extends ``b`` alone, idempotent), so
  its draft KV and first-draft distribution are what they would have been had the draft
  run every round. It closes the prefill gap, the tokens of off rounds (the free off:
  ``--speculative-num-steps 0`` rounds run no draft forward and no draft extend) and a
  radix hit on draft KV that was never written.

Only DSDE's worker swaps its draft worker to this class; ``StandaloneWorkerV2`` stays
SGLang's. Multimodal draft inputs are not supported (a plain LM draft reads token ids).
"""

from __future__ import annotations

import copy
from typing import List, Sequence

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.speculative.standalone_worker_v2 import StandaloneDraftWorker


class DSDEDraftWorker(StandaloneDraftWorker):
    """STANDALONE's draft worker, aligned (module docstring). Holds no state of its own
    beyond two flags; the owning ``DSDEWorkerV2`` swaps its draft worker's class to it."""

    _dsde_drafting = False
    #: A catch-up's extend is running (never deferred).
    _dsde_catching_up = False
    #: The owning DSDEWorkerV2 (set at the swap): its stub for a skipped draft extend.
    _dsde_owner = None

    # -- draft loop ---------------------------------------------------------------------

    def draft(self, batch, *, with_topology: bool = False):
        self._dsde_drafting = True
        try:
            return super().draft(batch, with_topology=with_topology)
        finally:
            self._dsde_drafting = False

    def align_draft_batch(self, forward_batch) -> None:
        """Move the draft loop's batch one position up (idempotent): ``seq_lens + 1``
        (the pending bonus token is in the draft's KV), positions ``+ 1``, and the KV slots
        ``S + 1 .. S + k`` planned by the draft's own translator."""
        if (not self._dsde_drafting or getattr(forward_batch, "_dsde_aligned", False)
                or forward_batch.forward_mode.is_idle()):
            return
        forward_batch._dsde_aligned = True
        bs = forward_batch.batch_size
        forward_batch.seq_lens = forward_batch.seq_lens + 1
        if forward_batch.seq_lens_cpu is not None:
            forward_batch.seq_lens_cpu = forward_batch.seq_lens_cpu + 1
        if forward_batch.seq_lens_sum is not None:
            forward_batch.seq_lens_sum = forward_batch.seq_lens_sum + bs
        if getattr(forward_batch, "max_seq_len_host", None) is not None:
            forward_batch.max_seq_len_host = forward_batch.max_seq_len_host + 1
        # New tensors: the draft loop advances positions in place.
        forward_batch.positions = forward_batch.positions + 1
        if getattr(forward_batch, "mrope_positions", None) is not None:
            forward_batch.mrope_positions = forward_batch.mrope_positions + 1
        translator = self.draft_runner.kv_index_translator
        plan = translator.plan_uniform_extend(
            req_pool_indices=forward_batch.req_pool_indices,
            seq_lens=forward_batch.seq_lens, seq_lens_cpu=forward_batch.seq_lens_cpu,
            width=self.speculative_num_steps * self.topk)
        plan.bind(forward_batch, translator)

    # -- draft extends ------------------------------------------------------------------

    def _draft_extend_for_prefill(self, batch, target_hidden_states, next_token_ids,
                                  mm_input_embeds=None, kv_loc_plan=None):
        """SGLang's prefill draft extend fed the chunk as it is. SGLang rotates each
        request's ids left and appends a tail token; rotating them right first (a roll of
        the flat ids) and passing each request's last id as the tail undoes that."""
        if batch.forward_mode.is_idle():
            return super()._draft_extend_for_prefill(
                batch, target_hidden_states, next_token_ids, mm_input_embeds,
                kv_loc_plan=kv_loc_plan)
        if mm_input_embeds is not None:
            raise NotImplementedError("DSDE: multimodal inputs to the draft model")
        owner = self._dsde_owner
        if not self._dsde_catching_up and owner is not None and owner.defer_draft_prefill():
            return self._deferred_prefill(batch, next_token_ids)
        ids = batch.input_ids
        ends = torch.as_tensor(_cumsum(batch.extend_lens), dtype=torch.int64)
        tail = ids[(ends - 1).to(ids.device)]
        saved = batch.input_ids, batch.chunked_req_next_prompt_token
        batch.input_ids = torch.roll(ids, 1)
        batch.chunked_req_next_prompt_token = None
        try:
            ret = super()._draft_extend_for_prefill(
                batch, target_hidden_states, tail, None, kv_loc_plan=kv_loc_plan)
        finally:
            batch.input_ids, batch.chunked_req_next_prompt_token = saved
        ret.bonus_tokens = next_token_ids
        return ret

    def _deferred_prefill(self, batch, next_token_ids):
        """The server is off: no draft extend for this prefill (the catch-up runs it when
        a request drafts). The next draft input carries the bonus tokens and
        shape-valid stubs, as an off round's does."""
        from types import SimpleNamespace

        from sglang.srt.speculative.eagle_info import EagleDraftInput

        owner = self._dsde_owner
        owner.draft_sync.defer_prefill(batch)
        ret = EagleDraftInput(bonus_tokens=next_token_ids, num_tokens_per_req=1,
                              num_tokens_for_logprob_per_req=1)
        owner._stub_skipped_draft_extend(batch, SimpleNamespace(next_draft_input=ret))
        return ret

    def _draft_extend_for_decode(self, batch, batch_result, *, kv_loc_plan=None):
        """Off round (no drafting): no draft extend (shape-valid stubs; the catch-up runs
        when the request drafts again). Drafting round: SGLang's extend, one slot up."""
        if self.speculative_num_steps == 0:
            self._dsde_owner._stub_skipped_draft_extend(batch, batch_result)
            return
        if batch.forward_mode.is_idle():
            return super()._draft_extend_for_decode(batch, batch_result,
                                                    kv_loc_plan=kv_loc_plan)
        saved = batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum
        bs = int(batch.seq_lens.shape[0])
        batch.seq_lens = batch.seq_lens + 1
        if batch.seq_lens_cpu is not None:
            batch.seq_lens_cpu = batch.seq_lens_cpu + 1
        if batch.seq_lens_sum is not None:
            batch.seq_lens_sum = batch.seq_lens_sum + bs
        try:
            translator = self.draft_runner.kv_index_translator
            plan = translator.plan_uniform_extend(
                req_pool_indices=batch.req_pool_indices, seq_lens=batch.seq_lens,
                seq_lens_cpu=batch.seq_lens_cpu, width=self.speculative_num_draft_tokens)
            return super()._draft_extend_for_decode(batch, batch_result, kv_loc_plan=plan)
        finally:
            batch.seq_lens, batch.seq_lens_cpu, batch.seq_lens_sum = saved

    # -- catch-up ----------------------------------------------------------------------

    def catch_up(self, batch, starts: Sequence[int], seq_lens: Sequence[int]):
        """One draft extend over positions ``starts[i] .. S_i`` of every request of the
        decode ``batch`` (``S_i = seq_lens[i]``, its pending bonus token). Tokens before
        ``S_i`` come from the request's host ids (the scheduler has processed every round
        up to the previous one, which for a request that is behind was an off round or a
        prefill); the bonus token from ``batch.spec_info`` on the device. Returns
        ``(draft input with the next first drafts, tokens extended)``; KV slots are the
        request's own (committed, and ``S`` reserved)."""
        reqs = batch.reqs
        tokens: List[int] = []
        positions: List[int] = []
        rows: List[int] = []
        lens: List[int] = []
        for row, (req, start, n) in enumerate(zip(reqs, starts, seq_lens)):
            start, n = int(start), int(n)
            tokens += _token_slice(req, start, n)
            tokens.append(0)  # the bonus token, filled on the device
            positions += range(start, n + 1)
            rows += [row] * (n + 1 - start)
            lens.append(n + 1 - start)
        total = len(tokens)
        device = batch.seq_lens.device
        packed = torch.tensor(tokens + positions + rows + _cumsum(lens), dtype=torch.int64)
        packed = packed.to(device, non_blocking=True)
        ids = packed[:total].clone()
        ids[packed[3 * total:] - 1] = batch.spec_info.bonus_tokens.to(torch.int64)
        pool_rows = batch.req_pool_indices.to(torch.int64)[packed[2 * total:3 * total]]
        locs = self.req_to_token_pool.req_to_token[pool_rows, packed[total:2 * total]]

        cb = copy.copy(batch)
        cb.forward_mode = ForwardMode.EXTEND
        cb.input_ids = ids
        cb.out_cache_loc = locs.to(torch.int64)
        cb.seq_lens = batch.seq_lens + 1
        if batch.seq_lens_cpu is not None:
            cb.seq_lens_cpu = batch.seq_lens_cpu + 1
        cb.seq_lens_sum = sum(int(n) for n in seq_lens) + len(reqs)
        cb.prefix_lens = [int(s) for s in starts]
        cb.extend_lens = lens
        cb.extend_num_tokens = total
        cb.extend_logprob_start_lens = [0] * len(reqs)
        cb.return_logprob = False
        cb.chunked_req = None
        cb.chunked_req_next_prompt_token = None
        cb.decoding_reqs = None
        cb.input_embeds = None
        cb.spec_info = None
        self._dsde_catching_up = True
        try:
            ret = self._draft_extend_for_prefill(cb, None, batch.spec_info.bonus_tokens)
        finally:
            self._dsde_catching_up = False
        return ret, total


def wrap_draft_state(draft_worker: DSDEDraftWorker) -> None:
    """Shift the draft loop's batch where the active runtime state consumes it: the
    multi-step attention backend's metadata (eager) and the draft graph's ``execute``.
    Idempotent per object (a runtime state's objects persist across switches)."""
    _align_before(draft_worker.draft_attn_backend, "init_forward_metadata", draft_worker)
    _align_before(draft_worker.cuda_graph_runner, "execute", draft_worker)


def _align_before(owner, method: str, draft_worker: DSDEDraftWorker) -> None:
    """Wrap ``owner.method(forward_batch, ...)`` (on this object) to align the batch
    first; once per object."""
    if owner is None or getattr(owner, "_dsde_aligned", False):
        return
    original = getattr(owner, method)

    def aligned(forward_batch, *a, **kw):
        draft_worker.align_draft_batch(forward_batch)
        return original(forward_batch, *a, **kw)

    setattr(owner, method, aligned)
    owner._dsde_aligned = True


def _cumsum(values: Sequence[int]) -> List[int]:
    out, acc = [], 0
    for v in values:
        acc += int(v)
        out.append(acc)
    return out


def _token_slice(req, start: int, stop: int) -> List[int]:
    """Token ids of ``req`` at positions ``start .. stop - 1`` (prompt, then output)."""
    prompt = req.origin_input_ids
    n = len(prompt)
    if stop <= n:
        return list(prompt[start:stop])
    head = list(prompt[start:]) if start < n else []
    tail = req.output_ids[max(start - n, 0):stop - n]
    if len(head) + len(tail) != stop - start:
        raise RuntimeError(f"DSDE catch-up: request {req.rid} has {n + len(req.output_ids)} "
                           f"host tokens, positions up to {stop - 1} needed")
    return head + list(tail)
