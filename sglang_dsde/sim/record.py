"""Record one request's acceptance/KL trace from a target/draft pair (torch only).

``record_request(target, draft, prompt_ids, max_new_tokens=N, max_steps=K)`` takes two
Hugging Face-style causal LMs (``model(input_ids, position_ids=..., attention_mask=...,
past_key_values=..., use_cache=True, logits_to_keep=...)`` returning ``.logits`` and
``.past_key_values`` with ``crop`` / ``batch_repeat_interleave``, e.g. transformers'
``DynamicCache``; nothing here imports transformers) and returns a ``RequestTrace``:

1. the target's greedy continuation ``out`` (N tokens, or up to and including a stop
   token), one token per cached forward;
2. one cached forward of ``prompt + out[:-1]`` through each model: row ``t`` of the last
   ``n`` logits is the target's ``p(. | c_t)`` and the draft's ``q(. | c_t)``, where
   ``c_t = prompt + out[:t]`` is the context of a round starting at output position t;
3. per chunk of positions (``chunk_positions`` rows at once, each row one position t): the
   draft rolls out greedily ``d_0 .. d_{K-1}`` from ``c_t`` (K - 1 batched one-token
   forwards on a copy of the shared prefix cache), then ONE target forward over
   ``d_0 .. d_{K-2}`` on the same prefix gives target rows 1 .. K-1; target row j is the
   target distribution after ``c_t`` and draft tokens ``0 .. j-1`` (row 0 is ``p(. |
   c_t)``), which is what the engine's verify pass computes (its input starts with the
   bonus token, the last token of ``c_t``). Rows see only their own prefix
   ``[0, len(c_t))`` and their own chain: a custom 4-D additive attention mask over the
   shared cache, explicit position ids;
4. ``kl[t] = kl_per_position(target rows, draft rows, K, T=0)`` (the engine's function,
   raw logits), ``draft_entropy[t]`` from the same call;
   ``accept[t]`` = leading ``j < min(K, n - t)`` with ``d_j == out[t + j]``;
   ``verify_disagree`` counts positions where acceptance read from the target rows'
   argmax (what verification computes) differs from that (float noise at near-ties).

Cost per request: N one-token target forwards, one prefix forward per model, and per
chunk K - 1 draft forwards of ``chunk`` tokens plus one target forward of
``chunk * (K - 1)`` tokens. Deterministic (no sampling); float32 on CPU in the bench.
"""

from __future__ import annotations

import copy
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from ..core.kl import kl_per_position
from ..trace import RequestTrace


@torch.inference_mode()
def greedy_generate(model, prompt_ids: Sequence[int], max_new_tokens: int,
                    stop_ids: Iterable[int] = ()) -> List[int]:
    """The model's greedy continuation: ``max_new_tokens`` tokens or up to a stop token."""
    stop = set(int(s) for s in stop_ids)
    device = _device_of(model)
    out: List[int] = []
    res = model(torch.tensor([list(prompt_ids)], device=device), use_cache=True,
                logits_to_keep=1)
    cache = res.past_key_values
    pos = len(prompt_ids)
    while True:
        token = int(res.logits[0, -1].argmax())
        out.append(token)
        if len(out) >= max_new_tokens or token in stop:
            return out
        res = model(torch.tensor([[token]], device=device), past_key_values=cache,
                    position_ids=torch.tensor([[pos]], device=device), use_cache=True,
                    logits_to_keep=1)
        cache = res.past_key_values
        pos += 1


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _chunk_mask(prefix_lens: torch.Tensor, shared_len: int, num_chain_cached: int,
                num_new: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, num_new, shared_len + num_chain_cached + num_new]`` additive mask.

    Row b sees shared keys ``[0, prefix_lens[b])``, every cached chain key of its own
    row, and the new tokens causally."""
    total = shared_len + num_chain_cached + num_new
    keys = torch.arange(total, device=prefix_lens.device)
    shared = keys[None, None, :] < prefix_lens[:, None, None]                 # [B,1,total]
    shared = shared & (keys < shared_len)[None, None, :]
    query = torch.arange(num_new, device=prefix_lens.device)
    chain = ((keys[None, :] >= shared_len)
             & (keys[None, :] < shared_len + num_chain_cached + 1 + query[:, None]))  # [q,total]
    visible = shared | chain[None]                                           # [B,q,total]
    mask = torch.zeros(visible.shape, dtype=dtype, device=prefix_lens.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def _prefix_cache(cache, full_len: int, keep_len: int, batch: int):
    """A copy of ``cache`` (``full_len`` positions) cut to ``keep_len``, repeated ``batch`` x."""
    cache = copy.deepcopy(cache)
    if keep_len < full_len:
        cache.crop(keep_len - full_len)
    cache.batch_repeat_interleave(batch)
    return cache


def _leading_matches(match: torch.Tensor) -> torch.Tensor:
    """``[B]`` count of leading True per row of ``[B, K]``."""
    return match.long().cumprod(dim=1).sum(dim=1)


@torch.inference_mode()
def record_request(target, draft, prompt_ids: Sequence[int], *, max_new_tokens: int,
                   max_steps: int, stop_ids: Iterable[int] = (), chunk_positions: int = 32,
                   req_id: str = "", source: str = "",
                   output_ids: Optional[Sequence[int]] = None) -> RequestTrace:
    """The trace of one request (module docstring). ``output_ids`` skips generation (the
    caller vouches that it is the target's greedy continuation)."""
    if max_steps < 1 or max_new_tokens < 1 or not prompt_ids:
        raise ValueError("record_request: need max_steps >= 1, max_new_tokens >= 1 and a "
                         "non-empty prompt")
    device = _device_of(target)
    prompt_ids = [int(x) for x in prompt_ids]
    out = (list(map(int, output_ids)) if output_ids is not None
           else greedy_generate(target, prompt_ids, max_new_tokens, stop_ids))
    num_tokens, prompt_len, K = len(out), len(prompt_ids), max_steps
    full = torch.tensor([prompt_ids + out[:-1]], device=device)  # contexts c_t, t < n
    full_len = full.shape[1]
    tgt = target(full, use_cache=True, logits_to_keep=num_tokens)
    dft = draft(full, use_cache=True, logits_to_keep=num_tokens)
    target_first = tgt.logits[0]   # [n, V]: p(. | c_t)
    draft_first = dft.logits[0]    # [n, V]: q(. | c_t)
    # Output padded with -1 (never a token id) so comparisons past the end fail.
    out_pad = torch.full((num_tokens + K,), -1, dtype=torch.long, device=device)
    out_pad[:num_tokens] = torch.tensor(out, device=device)

    accept = np.zeros(num_tokens, dtype=np.int64)
    kl = np.zeros((num_tokens, K), dtype=np.float32)
    entropy = np.zeros((num_tokens, K), dtype=np.float32)
    verify_disagree = 0
    for t0 in range(0, num_tokens, max(1, chunk_positions)):
        ts = torch.arange(t0, min(num_tokens, t0 + chunk_positions), device=device)
        batch = ts.shape[0]
        prefix_lens = prompt_len + ts                    # len(c_t)
        shared_len = int(prefix_lens[-1])                # longest prefix of the chunk
        # Draft rollout: d_0 from the prefix forward, d_1 .. d_{K-1} batched.
        draft_rows = [draft_first[ts]]
        chain = [draft_rows[0].argmax(dim=-1)]
        if K > 1:
            cache = _prefix_cache(dft.past_key_values, full_len, shared_len, batch)
            for j in range(1, K):
                mask = _chunk_mask(prefix_lens, shared_len, j - 1, 1, draft_first.dtype)
                res = draft(chain[-1][:, None], position_ids=(prefix_lens + j - 1)[:, None],
                            attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = res.past_key_values
                draft_rows.append(res.logits[:, -1])
                chain.append(draft_rows[-1].argmax(dim=-1))
        chain_ids = torch.stack(chain, dim=1)            # [B, K]
        draft_logits = torch.stack(draft_rows, dim=1)    # [B, K, V]
        target_rows = [target_first[ts][:, None]]
        if K > 1:
            cache = _prefix_cache(tgt.past_key_values, full_len, shared_len, batch)
            mask = _chunk_mask(prefix_lens, shared_len, 0, K - 1, target_first.dtype)
            positions = prefix_lens[:, None] + torch.arange(K - 1, device=device)[None]
            res = target(chain_ids[:, :K - 1], position_ids=positions, attention_mask=mask,
                         past_key_values=cache, use_cache=True)
            target_rows.append(res.logits)
        target_logits = torch.cat(target_rows, dim=1)    # [B, K, V]
        num_drafted = torch.full((batch,), K, dtype=torch.long, device=device)
        kl_b, ent_b = kl_per_position(target_logits, draft_logits, num_drafted,
                                      torch.zeros(batch, device=device),
                                      with_draft_entropy=True)
        expected = out_pad[ts[:, None] + torch.arange(K, device=device)[None]]  # [B, K]
        acc_b = _leading_matches(chain_ids == expected)
        available = (num_tokens - ts).clamp_max(K)
        acc_verify = torch.minimum(_leading_matches(chain_ids == target_logits.argmax(-1)),
                                   available)
        verify_disagree += int((acc_verify != acc_b).sum())
        rows = ts.cpu().numpy()
        accept[rows] = acc_b.cpu().numpy()
        kl[rows] = kl_b.cpu().numpy()
        entropy[rows] = ent_b.cpu().numpy()
    return RequestTrace(id=req_id, accept=accept, kl=kl, draft_entropy=entropy,
                        prompt_len=prompt_len, source=source, prompt_ids=prompt_ids,
                        output_ids=out, verify_disagree=verify_disagree)
