"""The CPU cost prior: round timings measured from Hugging Face forwards of the pair.

``measure_round_samples(target, draft, ...)`` times, per batch size ``bs`` on a cached
context of ``context`` tokens (random ids, seeded):

* ``draft_step(bs)``: one draft forward of ``bs`` tokens (one per request);
* ``verify(bs, k)``: one target forward of ``bs * (k + 1)`` tokens;
* ``extend(bs, k)``: one draft forward of ``bs * (k + 1)`` tokens (the draft extend);

and composes ``round(bs, k) = k * draft_step + verify + [k > 0] * extend`` (SGLang's
STANDALONE round without its scheduler, sampling and KV bookkeeping). Prefill samples
time both models over ``n`` prompt tokens. ``fit_linear_cost`` turns them into the prior.

This is a prior only: once the bench runs the real engine, the fit of its measured round
times (same ``fit_linear_cost``) replaces it. Medians of ``repeats`` after one warm-up;
the machine is shared, so expect run-to-run spread (docs/simulator.md).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from ..core.round_cost import LinearRoundCost
from .cost import fit_linear_cost


def _median_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _timed_forward(model, cache, batch_size: int, num_new: int, context: int,
                   gen: torch.Generator, vocab: int, repeats: int) -> float:
    """Median time of a forward of ``num_new`` tokens per row on ``cache`` (restored)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch_size, num_new), generator=gen).to(device)
    pos = (context + torch.arange(num_new, device=device))[None].expand(batch_size, -1)

    def run():
        model(ids, position_ids=pos, past_key_values=cache, use_cache=True)
        cache.crop(-num_new)

    return _median_seconds(run, repeats)


@torch.inference_mode()
def measure_round_samples(target, draft, *, batch_sizes: Sequence[int] = (1, 2, 4, 8),
                          steps: Sequence[int] = (0, 1, 2, 4, 8), context: int = 128,
                          prefill_lengths: Sequence[int] = (64, 128, 256), repeats: int = 3,
                          seed: int = 0, progress: Optional[Callable[[str], None]] = None
                          ) -> Dict[str, list]:
    """Timings (seconds) as ``{"rounds": [(bs, k, s)], "prefills": [(n, s)],
    "components": [{bs, k, draft_step, verify, extend}]}`` (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(min(target.config.vocab_size, draft.config.vocab_size))
    device = next(target.parameters()).device
    rounds, comps = [], []
    for bs in batch_sizes:
        ctx_ids = torch.randint(0, vocab, (bs, context), generator=gen).to(device)
        t_cache = target(ctx_ids, use_cache=True, logits_to_keep=1).past_key_values
        d_cache = draft(ctx_ids, use_cache=True, logits_to_keep=1).past_key_values
        draft_step = _timed_forward(draft, d_cache, bs, 1, context, gen, vocab, repeats)
        for k in steps:
            verify = _timed_forward(target, t_cache, bs, k + 1, context, gen, vocab, repeats)
            extend = (_timed_forward(draft, d_cache, bs, k + 1, context, gen, vocab, repeats)
                      if k > 0 else 0.0)
            total = k * draft_step + verify + extend
            rounds.append((bs, k, total))
            comps.append({"bs": bs, "k": k, "draft_step": draft_step, "verify": verify,
                          "extend": extend, "round": total})
            if progress:
                progress(f"bs {bs} k {k}: round {total * 1e3:.1f} ms")
    prefills = []
    for n in prefill_lengths:
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)

        def run():
            target(ids, use_cache=True, logits_to_keep=1)
            draft(ids, use_cache=True, logits_to_keep=1)

        prefills.append((n, _median_seconds(run, repeats)))
    return {"rounds": rounds, "prefills": prefills, "components": comps}


def measure_cpu_prior(target, draft, *, name: str = "cpu-prior", source: str = "",
                      **kwargs) -> LinearRoundCost:
    """``fit_linear_cost`` of ``measure_round_samples`` (raw timings in ``extra``)."""
    samples = measure_round_samples(target, draft, **kwargs)
    cost = fit_linear_cost(samples["rounds"], samples["prefills"], name=name, source=source)
    extra = dict(cost.extra, samples=copy.deepcopy(samples),
                 threads=torch.get_num_threads())
    return dataclasses.replace(cost, extra=extra)
