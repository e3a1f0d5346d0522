"""Ragged verify: each request verifies its own length, through SGLang's layout.

The batch drafts ``K`` steps (its largest length); request ``b`` is verified on its own
``L_b + 1`` tokens (the bonus token and its first ``L_b`` drafts). SGLang's verify path
builds one uniform ``[bs * (K + 1)]`` target-verify batch; this module wraps the target
worker's ``forward_batch_generation`` so that, in a round with a plan, that batch is
packed to the ``sum(L_b + 1)`` rows the requests need (input ids, positions, KV slots),
carries SGLang's ``RaggedVerifyLayout`` on its spec input (the attention backend reads
the per-request lengths from it), and the target's logits are scattered back to the
uniform layout the accept walk reads. Rows past a request's length hold zeros and are
never read: the worker cuts each request's chain at ``L_b`` (``retrieve_next_token``), so
no zero-filled row can be accepted. The KV slots of the unverified drafts are not written;
the draft extend after the verify uses the batch's full window as before.

Where it runs: an attention backend that honours the layout eagerly. Here that is the
plugin's CPU backend (``patches/cpu_spec_attention.py``); GPU backends keep the padded
verify until a ragged path has been shown correct on a GPU (``supported``).
"""

from __future__ import annotations

import logging
from typing import List, Optional

import torch

logger = logging.getLogger(__name__)


def supported(device: str) -> Optional[str]:
    """None where the ragged verify runs, else why not (one line for the log)."""
    if torch.device(device).type != "cpu":
        return ("a ragged verify is wired for the CPU attention backend only; GPU "
                "backends verify the full window until it is shown correct on a GPU")
    return None


def ragged_layout(lengths: List[int], device) -> object:
    """SGLang's ``RaggedVerifyLayout`` for verify widths ``lengths + 1`` (host ints)."""
    from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

    widths = [int(n) + 1 for n in lengths]
    verify_lens = torch.tensor(widths, dtype=torch.int32, device=device)
    indptr = torch.zeros(len(widths) + 1, dtype=torch.int32, device=device)
    indptr[1:] = torch.cumsum(verify_lens, dim=0)
    total = sum(widths)
    return RaggedVerifyLayout(verify_lens=verify_lens, graph_num_tokens=total,
                              extend_start_loc=indptr[:-1], qo_indptr_device=indptr,
                              verify_lens_cpu=widths, total_verify_tokens=total)


def packed_rows(lengths: List[int], width: int, device) -> torch.Tensor:
    """Row indices into the uniform ``[bs * width]`` layout of the rows each request
    verifies (its first ``L_b + 1``), in order."""
    rows = [b * width + j for b, n in enumerate(lengths) for j in range(int(n) + 1)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


class RaggedVerify:
    """The round's plan (per-request lengths) and the target-worker wrapper."""

    def __init__(self):
        #: Host lengths of the round in flight, or None: a uniform verify.
        self.lengths: Optional[List[int]] = None
        self.width = 0

    def plan(self, lengths: List[int], steps: int) -> None:
        """Verify request b on ``lengths[b] <= steps`` drafts this round."""
        self.lengths = [min(max(int(n), 0), steps) for n in lengths]
        self.width = steps + 1

    def clear(self) -> None:
        self.lengths = None

    @property
    def verified_tokens(self) -> Optional[int]:
        """Target tokens this round verifies over the batch (None: uniform)."""
        return None if self.lengths is None else sum(n + 1 for n in self.lengths)

    def install(self, target_worker) -> None:
        """Wrap ``target_worker.forward_batch_generation`` on this instance (once)."""
        if getattr(target_worker, "_dsde_ragged_wrapped", False):
            return
        forward, plan = target_worker.forward_batch_generation, self

        def forward_maybe_packed(*args, is_verify: bool = False, **kwargs):
            forward_batch = kwargs.get("forward_batch")
            if not is_verify or plan.lengths is None or forward_batch is None:
                return forward(*args, is_verify=is_verify, **kwargs)
            return plan._verify_packed(forward, forward_batch, args, kwargs)

        target_worker.forward_batch_generation = forward_maybe_packed
        target_worker._dsde_ragged_wrapped = True

    def _verify_packed(self, forward, forward_batch, args, kwargs):
        rows = packed_rows(self.lengths, self.width, forward_batch.input_ids.device)
        full = (forward_batch.input_ids, forward_batch.positions,
                forward_batch.out_cache_loc)
        spec_info = forward_batch.spec_info
        forward_batch.input_ids = full[0][rows]
        forward_batch.positions = full[1][rows]
        forward_batch.out_cache_loc = full[2][rows]
        spec_info.ragged_verify_layout = ragged_layout(self.lengths, rows.device)
        try:
            result = forward(*args, is_verify=True, **kwargs)
        finally:
            (forward_batch.input_ids, forward_batch.positions,
             forward_batch.out_cache_loc) = full
            spec_info.ragged_verify_layout = None
        logits_output = result.logits_output
        packed = logits_output.next_token_logits
        uniform = packed.new_zeros((full[0].shape[0], packed.shape[1]))
        uniform[rows] = packed
        logits_output.next_token_logits = uniform
        return result
