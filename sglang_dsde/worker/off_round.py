"""The free off: a round whose batch decision is 0 drafts nothing and runs no draft
extend (read against SGLang 0.5.23).

SGLang's no-drafting state (``--speculative-num-steps 0`` among the adaptive runtime
states) verifies the pending bonus token as a one-node tree through the target's
``TARGET_VERIFY`` forward (its captured ``nd = 1`` graph on a GPU), then runs the draft
extend. DSDE's draft worker skips that extend (``worker/aligned.py``: the catch-up
extends the skipped tokens when the request drafts again), so on a GPU an off round is
the target's one-token verify through its own graph and nothing of the draft.

Without graphs (the CPU engine) a plain target decode forward is cheaper than a
one-token verify: :class:`OffRoundDecode` replaces the verify of an off round with
``TpModelWorker.forward_batch_generation`` on the batch in ``DECODE`` mode (the bonus
token at its own slot, ``seq_lens + 1``), and returns what the verify returns: the
sampled token, one accepted token per request, ``seq_lens + 1``. It applies only when
nothing needs the verify path's extras: no grammar, no logprobs, no hybrid (mamba) or
HiSparse state, one pipeline stage, and the target runs eagerly (``SGLANG_DSDE_OFF_PATH=
verify`` keeps the verify path everywhere, for comparisons).

Sampling: greedy requests take the same argmax; sampled ones draw from the same
distribution through the plain sampler instead of the verify's (the sample differs,
the distribution does not).
"""

from __future__ import annotations

import copy
import os

import torch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.runtime_context import get_parallel
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.speculative.eagle_info import EagleDraftInput


class OffRoundDecode:
    """Mixin placed before SGLang's worker: ``verify`` of an off round by a plain decode
    when :meth:`_plain_off_round` allows it (module docstring)."""

    _off_path_env = os.environ.get("SGLANG_DSDE_OFF_PATH", "decode")
    #: Off rounds served by a plain decode (host counter, ``/server_info``).
    plain_off_rounds = 0

    def _plain_off_round(self, batch) -> bool:
        if self.speculative_num_steps != 0 or self._off_path_env == "verify":
            return False
        if batch.forward_mode.is_idle() or batch.has_grammar or batch.return_logprob:
            return False
        if batch.hisparse_coordinator is not None or batch.mamba_track_indices is not None:
            return False
        runner = self._target_worker.model_runner
        return runner.decode_cuda_graph_runner is None and get_parallel().pp_size == 1

    def verify(self, batch, pp_proxy_tensors=None, grammar_barrier=None):
        if not self._plain_off_round(batch):
            return super().verify(batch, pp_proxy_tensors=pp_proxy_tensors,
                                  grammar_barrier=grammar_barrier)
        self.plain_off_rounds += 1
        return self._decode_off_round(batch)

    def _decode_off_round(self, batch) -> GenerationBatchResult:
        """One target decode step for the batch's pending bonus tokens."""
        bonus = batch.spec_info.draft_token
        bs = int(batch.seq_lens.shape[0])
        rows = batch.req_pool_indices.to(torch.int64)
        decode = copy.copy(batch)
        decode.forward_mode = ForwardMode.DECODE
        decode.input_ids = bonus
        decode.out_cache_loc = self.req_to_token_pool.req_to_token[
            rows, batch.seq_lens.to(torch.int64)].to(torch.int64)
        decode.seq_lens = batch.seq_lens + 1
        if batch.seq_lens_cpu is not None:
            decode.seq_lens_cpu = batch.seq_lens_cpu + 1
        if batch.seq_lens_sum is not None:
            decode.seq_lens_sum = batch.seq_lens_sum + bs
        decode.spec_info = None
        out = self._target_worker.forward_batch_generation(decode)
        next_ids = out.next_token_ids
        ones = torch.ones(bs, dtype=torch.int32, device=next_ids.device)
        return GenerationBatchResult(
            logits_output=out.logits_output,
            next_token_ids=next_ids,
            can_run_cuda_graph=out.can_run_cuda_graph,
            speculative_num_draft_tokens=1,
            next_draft_input=EagleDraftInput(bonus_tokens=next_ids.to(torch.int32)),
            accept_lens=ones,
            accept_index=torch.arange(bs, device=next_ids.device).unsqueeze(1),
            new_seq_lens=decode.seq_lens,
            extra_keep_alive_refs=[decode],
        )
