"""The DSDE signal: KL(p_target || q_draft) per drafted position, from logits.

Contract (``kl_per_position``):

* ``target_logits``, ``draft_logits``: ``[bs, P, V]`` (any float dtype; P = the widest
  draft of the batch, usually ``max_steps``). Row ``(i, j)`` pairs the target distribution
  at drafted position j of request i with the draft distribution that proposed the token
  there (in SGLang's verify output, target row ``b * ndt + j`` with the draft step j).
* ``num_drafted``: ``[bs]`` integers; positions ``j >= num_drafted[i]`` are not drafted and
  get KL 0 whatever their logits hold (even NaN).
* ``temperature``: ``[bs]``; 0 means a greedy request.

Which distributions: for a greedy request (T = 0) the softmax of the *raw* logits, so the
signal stays a real divergence instead of the 0 / 18.4 mismatch flag that one-hot greedy
distributions would give; for a sampled request (T > 0) the softmax of ``logits / T``.
Top-k / top-p / min-p truncation is not applied (the signal describes the models, not the
sampler). Logits may hold -inf (grammar masks): those tokens have probability 0.

The formula, exactly (float64 reference in tests/unit/test_kl.py)::

    KL = max(0, sum_v p(v) * (log max(p(v), 1e-8) - log max(q(v), 1e-8)))

The factor ``p(v)`` is not clamped; the clamp acts on the logs only (docs/algorithm.md:
"probabilities are clamped at 1e-8 before the logs"). The clamp can push the literal sum
below zero by at most log(1 + V * 1e-8); a divergence is never negative, hence the outer
``max(0, .)`` (it also absorbs float32 rounding when p ~= q).

Memory: the vocabulary is processed in chunks of ``chunk_cols`` columns, in two passes
(online log-sum-exp of both sides, then the divergence), so float32 temporaries are
``O(bs * P * chunk_cols)``, never ``bs * P * V``. The inputs are read twice and never
copied whole. No host synchronisation: chunk sizes depend on shapes only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

#: Probabilities are clamped at this value before the logs.
PROB_FLOOR = 1e-8
_LOG_FLOOR = math.log(PROB_FLOOR)

#: Default bound on the elements of one float32 temporary: 1 MiB on CPU (cache-sized),
#: 64 MiB on an accelerator (fewer, larger kernels: launch cost dominates small chunks).
_CHUNK_ELEMS_CPU = 1 << 18
_CHUNK_ELEMS_ACCEL = 1 << 24


def default_chunk_cols(num_rows: int, vocab_size: int, device: torch.device) -> int:
    """Columns per chunk so that one float32 temporary holds at most the default budget."""
    budget = _CHUNK_ELEMS_CPU if device.type == "cpu" else _CHUNK_ELEMS_ACCEL
    return max(1, min(vocab_size, budget // max(1, num_rows)))


def kl_per_position(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                    num_drafted: torch.Tensor, temperature: Optional[torch.Tensor] = None,
                    *, chunk_cols: Optional[int] = None,
                    with_draft_entropy: bool = False):
    """``[bs, P]`` float32 KL(p_target || q_draft) per drafted position (0 elsewhere).

    With ``with_draft_entropy`` returns ``(kl, draft_entropy)``, the entropy (nats) of the
    draft distribution at each drafted position computed in the same pass (0 elsewhere);
    the AdaEDL-style baseline reads it.
    """
    if target_logits.shape != draft_logits.shape or target_logits.dim() != 3:
        raise ValueError(f"kl_per_position: target and draft logits must both be "
                         f"[bs, P, V]; got {tuple(target_logits.shape)} and "
                         f"{tuple(draft_logits.shape)}")
    bs, num_pos, vocab = target_logits.shape
    device = target_logits.device
    rows = bs * num_pos
    target = target_logits.reshape(rows, vocab)
    draft = draft_logits.reshape(rows, vocab)
    if temperature is None:
        temperature = torch.zeros(bs, device=device)
    temperature = temperature.to(device=device, dtype=torch.float32).reshape(bs)
    # Greedy (T = 0) rows use the raw logits: scale 1. Sampled rows use logits / T.
    inv_temp = 1.0 / torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    row_scale = inv_temp.repeat_interleave(num_pos).unsqueeze(1)  # [rows, 1]
    cols = chunk_cols or default_chunk_cols(rows, vocab, device)

    lse_target = _log_sum_exp(target, row_scale, cols)
    lse_draft = _log_sum_exp(draft, row_scale, cols)

    kl = torch.zeros(rows, device=device, dtype=torch.float32)
    entropy = torch.zeros_like(kl) if with_draft_entropy else None
    for start in range(0, vocab, cols):
        stop = min(vocab, start + cols)
        # In-place arithmetic on two chunk buffers: fewer allocations (on CPU a fresh
        # large buffer costs page faults) and a bounded footprint.
        log_p = (target[:, start:stop].float() * row_scale).sub_(lse_target)
        log_q = (draft[:, start:stop].float() * row_scale).sub_(lse_draft)
        if entropy is not None:
            q = log_q.exp()
            entropy -= torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(dim=1)
        p = log_p.exp()
        # log max(p, eps) == max(log p, log eps); log p = -inf (masked token) gives p = 0
        # and a finite clamped log, so the product is 0, never NaN.
        log_p.clamp_min_(_LOG_FLOOR).sub_(log_q.clamp_min_(_LOG_FLOOR))
        kl += p.mul_(log_p).sum(dim=1)

    drafted = (torch.arange(num_pos, device=device).unsqueeze(0)
               < num_drafted.to(device).reshape(bs, 1))
    kl = torch.where(drafted, kl.reshape(bs, num_pos).clamp_min(0.0), 0.0)
    if entropy is None:
        return kl
    entropy = torch.where(drafted, entropy.reshape(bs, num_pos).clamp_min(0.0), 0.0)
    return kl, entropy


def entropy_of_logits(logits: torch.Tensor, *, chunk_cols: Optional[int] = None
                      ) -> torch.Tensor:
    """``[rows]`` float32 entropy (nats) of ``softmax(logits)`` for ``[rows, V]`` raw logits.

    The goodput policy reads it for each request's first draft distribution before the
    round (the same value ``kl_per_position(..., with_draft_entropy=True)`` gives at
    position 0 of a greedy row). Non-finite logits give NaN ("unknown").
    """
    rows, vocab = logits.shape
    ones = torch.ones(rows, 1, device=logits.device)
    cols = chunk_cols or default_chunk_cols(rows, vocab, logits.device)
    lse = _log_sum_exp(logits, ones, cols)
    entropy = torch.zeros(rows, device=logits.device, dtype=torch.float32)
    for start in range(0, vocab, cols):
        log_q = logits[:, start:min(vocab, start + cols)].float().sub_(lse)
        q = log_q.exp()
        entropy -= torch.where(q > 0, q * log_q, torch.zeros_like(q)).sum(dim=1)
    finite = torch.isfinite(logits).all(dim=1)
    return torch.where(finite, entropy.clamp_min(0.0), float("nan"))


def _log_sum_exp(logits: torch.Tensor, row_scale: torch.Tensor, cols: int) -> torch.Tensor:
    """``[rows, 1]`` log-sum-exp of ``logits * row_scale``, streamed over column chunks.

    A running max and a rescaled running sum (accurate over hundreds of chunks, unlike a
    chain of ``logaddexp``)."""
    rows, vocab = logits.shape
    run_max = torch.full((rows, 1), -math.inf, device=logits.device)
    run_sum = torch.zeros((rows, 1), device=logits.device)
    for start in range(0, vocab, cols):
        x = logits[:, start:min(vocab, start + cols)].float() * row_scale
        new_max = torch.maximum(run_max, x.amax(dim=1, keepdim=True))
        # A row that is all -inf so far keeps a finite shift, so no (-inf) - (-inf) = NaN.
        shift = torch.where(torch.isfinite(new_max), new_max, 0.0)
        run_sum = run_sum * (run_max - shift).exp() + x.sub_(shift).exp_().sum(dim=1, keepdim=True)
        run_max = new_max
    return torch.where(torch.isfinite(run_max), run_max, 0.0) + run_sum.log()
