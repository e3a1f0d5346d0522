"""Touch-point: sampled requests are sampled on CPU (speculative verify, target-only).

Read against SGLang 0.5.23 (``srt/speculative/eagle_utils.py``, ``eagle_sample``). The
verify of every EAGLE-family worker (STANDALONE, so DSDE) takes one of two branches:

* greedy: ``argmax`` of the target logits, then ``verify_tree_greedy_func``;
* sampling: target probabilities (temperature softmax, ``top_k_renorm_prob``,
  ``top_p_renorm_prob``) and ``tree_speculative_sampling_target_only``: walking the draft
  chain, draft token ``x_j`` is accepted with probability ``p_j(x_j)``; on a rejection the
  token is drawn from ``p_j`` with ``x_j`` removed (renormalised), and after a fully
  accepted chain the bonus token is drawn from ``p`` at the last node. With a draft that
  proposes deterministically this is exact rejection sampling: the committed tokens follow
  the target distribution.

``_verify_uses_greedy`` sends every CPU batch to the greedy branch (``is_cpu``), and on CPU
the sampling kernels are ``None`` (``kernels/ops/speculative/verify_sampling.py``,
``kernels/ops/sampling/renorm.py``): a T = 1 request was greedy after its first token.

This module, applied only when SGLang runs on CPU:

* provides :func:`tree_speculative_sampling_target_only` in pure torch (the semantics of
  SGLang's CUDA kernel ``TreeSpeculativeSamplingTargetOnly``, thresholds included), put in
  place of the ``None`` in ``verify_sampling`` and in the modules that imported the name;
* wraps ``_verify_uses_greedy`` (AROUND) to answer as on a GPU: greedy only when the whole
  batch is greedy;
* wraps ``eagle_sample`` (AROUND) for sampled batches so that the distribution is the plain
  CPU sampler's, not an approximation of it: SGLang's CPU sampler (``sampling_backend``
  ``pytorch``, ``top_k_top_p_min_p_sampling_from_probs_torch``) filters top-k, top-p and
  min-p *jointly* on the temperature-scaled probabilities, while the GPU verify renormalises
  top-k, then top-p, and ignores min-p. The wrapper hides top-k / top-p from
  ``eagle_sample`` (a shallow copy of ``sampling_info`` with both flags off) so it hands the
  op the plain temperature softmax of the penalised, biased, grammar-masked logits; the op
  applies the CPU sampler's own filter (SGLang's function, per verify row) before
  verifying. A greedy request in a mixed batch has ``top_k = 1``: its row is one-hot.
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

import contextvars
import copy
import sys
from typing import Optional

SGLANG_VERSION_READ = "0.5.23"

_EAGLE_UTILS = "sglang.srt.speculative.eagle_utils"
_VERIFY_SAMPLING = "sglang.kernels.ops.speculative.verify_sampling"
#: Modules that bind ``tree_speculative_sampling_target_only`` by ``from ... import``.
_IMPORTERS = (_VERIFY_SAMPLING, _EAGLE_UTILS, "sglang.srt.speculative.dflash_utils")
_OP_NAME = "tree_speculative_sampling_target_only"

HOOKED_SYMBOLS = (
    f"{_EAGLE_UTILS}.eagle_sample",
    f"{_EAGLE_UTILS}._verify_uses_greedy",
    # Modules binding the op (None on CPU; tests/unit checks the name is there).
    _VERIFY_SAMPLING,
    _EAGLE_UTILS,
    "sglang.srt.layers.sampler.top_k_top_p_min_p_sampling_from_probs_torch",
    # Its need_top_k_sampling / need_top_p_sampling / need_min_p_sampling fields.
    "sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo",
    "sglang.srt.utils.common.is_cpu",
)

#: The real sampling info of the CPU verify in progress (set by the eagle_sample wrapper).
_VERIFY_FILTER: contextvars.ContextVar = contextvars.ContextVar("dsde_cpu_verify_filter",
                                                                default=None)


def apply() -> None:
    """Install the op and the two hooks; only when SGLang runs on CPU."""
    if not register_once(__name__, [(HOOKED_SYMBOLS[1], _sample_like_a_gpu, "AROUND"),
                                    (HOOKED_SYMBOLS[0], _sample_like_the_cpu_sampler,
                                     "AROUND")], cpu_only=True):
        return
    import importlib

    for name in _IMPORTERS:
        # The two that eagle_sample reads are imported; another importer is patched if
        # loaded (a later ``from verify_sampling import`` binds the op already).
        module = (importlib.import_module(name) if name in (_VERIFY_SAMPLING, _EAGLE_UTILS)
                  else sys.modules.get(name))
        if module is not None and getattr(module, _OP_NAME, None) is None:
            # Not through HookRegistry: its REPLACE would also "propagate" to every
            # module attribute that is None.
            setattr(module, _OP_NAME, tree_speculative_sampling_target_only)


def installed() -> bool:
    module = sys.modules.get(_EAGLE_UTILS)
    return getattr(module, _OP_NAME, None) is tree_speculative_sampling_target_only


# -- hooks -----------------------------------------------------------------------------


def _sample_like_a_gpu(original, *args, **kwargs):
    """AROUND ``_verify_uses_greedy``: the CPU no longer forces the greedy branch."""
    if installed() and "is_cpu" in kwargs:
        kwargs = {**kwargs, "is_cpu": False}
    return original(*args, **kwargs)


class _JointFilter:
    """The plain CPU sampler's filter for the rows of one verify (``ndt`` per request)."""

    def __init__(self, info, draft_token_num: int):
        self.info = info
        self.ndt = int(draft_token_num)

    @property
    def needed(self) -> bool:
        info = self.info
        return bool(info.need_top_k_sampling or info.need_top_p_sampling
                    or info.need_min_p_sampling)

    def apply(self, probs):
        """``probs`` [rows, V] (rows = bs * ndt) -> filtered and renormalised, as SGLang's
        ``top_k_top_p_min_p_sampling_from_probs_torch`` samples from."""
        import torch
        from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

        info = self.info

        def per_row(values):
            return torch.repeat_interleave(values.reshape(-1), self.ndt, dim=0)

        _, kept_sorted, order, _ = top_k_top_p_min_p_sampling_from_probs_torch(
            probs.clone(), per_row(info.top_ks), per_row(info.top_ps),
            per_row(info.min_ps), bool(info.need_min_p_sampling), None, None,
            return_filtered_probs=True)
        kept = torch.zeros_like(probs).scatter_(-1, order.long(), kept_sorted.to(probs.dtype))
        return kept / kept.sum(dim=-1, keepdim=True)


def _sample_like_the_cpu_sampler(original, verify_input, batch, logits_output, *args,
                                 **kwargs):
    """AROUND ``eagle_sample``: for a sampled batch, hide top-k / top-p from it and let the
    op filter jointly (module docstring)."""
    info = batch.sampling_info
    if info is None or info.is_all_greedy or batch.forward_mode.is_idle() or not installed():
        return original(verify_input, batch, logits_output, *args, **kwargs)
    hidden = copy.copy(info)
    hidden.need_top_k_sampling = False
    hidden.need_top_p_sampling = False
    token = _VERIFY_FILTER.set(_JointFilter(info, verify_input.draft_token_num))
    batch.sampling_info = hidden
    try:
        return original(verify_input, batch, logits_output, *args, **kwargs)
    finally:
        batch.sampling_info = info
        _VERIFY_FILTER.reset(token)


# -- the op ----------------------------------------------------------------------------


def tree_speculative_sampling_target_only(predicts, accept_index, accept_token_num,
                                          candidates, retrive_index, retrive_next_token,
                                          retrive_next_sibling, uniform_samples,
                                          uniform_samples_for_final_sampling, target_probs,
                                          draft_probs, threshold_single: float = 1.0,
                                          threshold_acc: float = 1.0,
                                          deterministic: bool = True) -> None:
    """Verify a draft tree against target probabilities only (SGLang's CUDA kernel).

    Shapes as the kernel's: ``candidates`` / ``retrive_*`` / ``uniform_samples`` [bs, n],
    ``target_probs`` / ``draft_probs`` [bs, n, V], ``accept_index`` [bs, depth],
    ``predicts`` [bs * n], ``accept_token_num`` [bs]; outputs are written in place.
    Per request: from the root, the children of the last accepted node are tried in
    sibling order; child ``x`` is accepted when ``p(x) > 0`` and the coin of the last
    accepted node is below (sum of ``p`` over the children tried) / ``threshold_acc``, or
    ``p(x) >= threshold_single``; a rejected child's mass goes into ``draft_probs`` so the
    final draw, from ``relu(p - draft_probs)`` at the last accepted node (from ``p`` after a
    full chain), excludes it. Inside a CPU verify the plain sampler's joint top-k / top-p /
    min-p filter is applied to ``target_probs`` first (module docstring).
    """
    import torch

    bs, n = candidates.shape
    if bs == 0:
        return
    depth = accept_index.shape[1]
    vocab = target_probs.shape[-1]
    joint: Optional[_JointFilter] = _VERIFY_FILTER.get()
    probs = target_probs
    if joint is not None and joint.needed:
        probs = joint.apply(target_probs.reshape(bs * n, vocab)).reshape(bs, n, vocab)
    threshold_acc = max(float(threshold_acc), 1e-9)
    cand = candidates.tolist()
    r_index = retrive_index.tolist()
    r_next = retrive_next_token.tolist()
    r_sib = retrive_next_sibling.tolist()
    coins = uniform_samples.tolist()
    final_coins = uniform_samples_for_final_sampling.tolist()
    for b in range(bs):
        prob_acc = 0.0
        row = 0  # the node whose target distribution applies next
        coin = coins[b][0]
        last = r_index[b][0]
        accept_index[b, 0] = last
        accepted = 0
        cur = 0
        for _ in range(1, depth):
            cur = r_next[b][cur]
            while cur != -1:
                token = cand[b][cur]
                p = float(probs[b, row, token])
                prob_acc += p
                if p > 0 and (coin < prob_acc / threshold_acc or p >= threshold_single):
                    prob_acc = 0.0
                    row = cur
                    coin = coins[b][cur]
                    predicts[last] = token
                    accepted += 1
                    accept_index[b, accepted] = r_index[b][cur]
                    last = r_index[b][cur]
                    break
                draft_probs[b, row, token] = probs[b, row, token]
                cur = r_sib[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        residual = probs[b, row]
        if accepted != depth - 1:  # no draft distribution for the bonus token
            residual = torch.clamp(residual - draft_probs[b, row], min=0)
        predicts[last] = _draw(residual, final_coins[b])


def _draw(weights, coin: float) -> int:
    """The first index whose inclusive prefix sum exceeds ``coin * sum`` (the kernel's
    inverse-CDF draw); the last index with mass when rounding leaves none."""
    import torch

    cdf = torch.cumsum(weights.double(), dim=0)
    total = float(cdf[-1])
    index = int(torch.searchsorted(cdf, torch.tensor([coin * total], dtype=cdf.dtype),
                                   right=True)[0])
    if index >= weights.shape[0] or float(weights[index]) <= 0:
        nonzero = torch.nonzero(weights > 0)
        index = int(nonzero[-1]) if nonzero.numel() else weights.shape[0] - 1
    return index
