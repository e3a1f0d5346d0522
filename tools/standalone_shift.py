"""Diagnostic: how much SGLang 0.5.23's shifted STANDALONE draft inputs cost acceptance.

``python -m tools.standalone_shift [--model T] [--prompts N] [--steps K]`` (replay), and
``python -m tools.standalone_shift --engine [--draft D] [--steps K] [--code-prompts N]``
(real CPU servers: STANDALONE and DSDE with a static SL, radix cache on, greedy, on the
chat questions and HumanEval code prompts; accept length per workload, DSDE's
first-draft misses, and whether each output equals a server without speculation;
figures in docs/standalone-alignment.md).

SGLang's STANDALONE worker reuses EAGLE's draft inputs: the prefill draft-extend feeds
``input_ids[1:] + [next_token]`` at positions ``0..L-1`` (``speculative/eagle_worker_v2.py``,
``_draft_extend_for_prefill``) and the decode draft-extend feeds the target's predictions
(token ``p + 1`` at position ``p``, ``speculative/eagle_worker_common.py``,
``prepare_for_draft_extend``). A plain LM draft therefore sees the sequence *without its
first token*, at positions shifted down by one (RoPE is relative, so the shift itself is
harmless; losing token 0 - the chat template's ``<|im_start|>``, an attention sink - is
not). With the radix cache on, the draft's KV at the last cached slot also holds the
previous request's next token (our reading: the slot pairs with token ``p + 1`` while the
prefix match only covers tokens ``<= p``; the radix on/off rows below show the effect).

This script replays greedy STANDALONE rounds (topk 1, ``--steps`` drafts) with HF
transformers, draft == target, once with the draft seeing ``sequence[1:]`` (what SGLang
does) and once with the full sequence. Measured on SmolLM2-135M-Instruct, float32, the 20
chat prompts of ``tests/e2e/test_standalone_smollm2.py``, 32 new tokens, 4 steps:

- replay, draft sees the full sequence:    accept length 5.00, first draft missed 0/140 rounds
- replay, draft sees ``sequence[1:]``:      accept length 4.27, first draft missed 14/155
- SGLang server, ``--disable-radix-cache``: accept length 4.18, first draft missed 14/136
- SGLang server, radix cache on (default):  accept length 3.66, first draft missed 29/154

(accept length = tokens per verify round incl. the bonus token, at most steps + 1.) Output
tokens are identical in all cases: the target verifies every token, so this costs speed,
never correctness.
"""

from __future__ import annotations

import argparse
import sys

from tools.testing import CHAT_QUESTIONS


def replay(model, prompt_ids, *, steps: int, max_new_tokens: int, shifted: bool):
    """Accept lengths of greedy STANDALONE rounds with draft == ``model``."""
    import torch

    @torch.no_grad()
    def argmax_last(ids, k=1):
        return model(torch.tensor([ids])).logits[0, -k:].argmax(-1).tolist()

    committed = list(prompt_ids)
    bonus = argmax_last(committed)[0]
    generated, rounds = 1, []
    while generated < max_new_tokens:
        drafts = []
        for _ in range(steps):
            ctx = committed + [bonus] + drafts
            drafts.append(argmax_last(ctx[1:] if shifted else ctx)[0])
        preds = argmax_last(committed + [bonus] + drafts, k=steps + 1)
        accept = 1
        while accept <= steps and drafts[accept - 1] == preds[accept - 1]:
            accept += 1
        rounds.append(accept)
        committed += [bonus] + drafts[:accept - 1]
        bonus = preds[accept - 1]
        generated += accept
    return rounds


def _workloads(tok, num_chat: int, num_code: int) -> dict:
    """Token ids of the chat questions (chat template) and of HumanEval code prompts."""
    from bench.workloads import load_workload

    chat = []
    for q in CHAT_QUESTIONS[:num_chat]:
        enc = tok.apply_chat_template([{"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=True)
        chat.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    code = [list(p.input_ids) for p in load_workload("code", num_code, seed=0, tokenizer=tok,
                                                     max_prompt_tokens=384)]
    return {"chat": chat, "code": code}


def _serve(server, prompts, max_new_tokens: int, concurrency: int = 4) -> list:
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda ids: server.generate(
            input_ids=ids, max_new_tokens=max_new_tokens), prompts))


def _accept_length(results) -> float:
    """Tokens per verify round, bonus included (no prefill token): accepted drafts plus
    one per round, over the rounds."""
    rounds = sum(r["meta_info"].get("spec_verify_ct", 0) for r in results)
    drafts = sum(r["meta_info"].get("spec_num_correct_drafts", 0) for r in results)
    return (drafts + rounds) / rounds if rounds else float("nan")


def engine(args) -> int:
    """STANDALONE vs DSDE (static SL) on real CPU servers (module docstring)."""
    from transformers import AutoTokenizer

    from sglang_dsde.models import ensure_target
    from tools.testing import running_server

    target = args.model or ensure_target()
    draft = args.draft or target
    tok = AutoTokenizer.from_pretrained(target)
    work = _workloads(tok, args.prompts, args.code_prompts)
    with running_server(target, algorithm=None, max_total_tokens=16384) as server:
        plain = {name: [r["output_ids"] for r in _serve(server, p, args.max_new_tokens)]
                 for name, p in work.items()}
    for steps, (label, algorithm) in ((k, c) for k in args.steps
                                      for c in (("STANDALONE", "STANDALONE"), ("DSDE", "DSDE"))):
        extra = (["--dsde-policy", "static", "--dsde-max-steps", str(steps)]
                 if algorithm == "DSDE" else [])
        with running_server(target, draft_model_path=draft, algorithm=algorithm,
                            extra_args=extra, max_total_tokens=16384,
                            num_steps=steps) as server:
            for name, prompts in work.items():
                results = _serve(server, prompts, args.max_new_tokens)
                same = sum(r["output_ids"] == w for r, w in zip(results, plain[name]))
                print(f"{label:10s} k={steps} {name:4s} accept length "
                      f"{_accept_length(results):.3f} of {steps + 1}; identical to no "
                      f"speculation {same}/{len(prompts)}", flush=True)
            info = server.server_info()
            dsde = next((s["dsde"] for s in info.get("internal_states", []) if "dsde" in s),
                        None)
            extra_text = ""
            if dsde is not None:
                extra_text = (f"; first-draft misses {dsde['first_draft_misses']} of "
                              f"{dsde['drafted_request_rounds']} request-rounds")
            print(f"{label:10s} k={steps} /server_info accept length "
                  f"{server.accept_length():.3f}"
                  f"{extra_text}", flush=True)
    return 0


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(prog="python -m tools.standalone_shift")
    ap.add_argument("--model", default=None, help="HF folder (default: the prepared target)")
    ap.add_argument("--prompts", type=int, default=len(CHAT_QUESTIONS))
    ap.add_argument("--steps", type=int, nargs="+", default=[4],
                    help="draft steps (--engine: one pair of servers per value)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--engine", action="store_true", help="real servers (module docstring)")
    ap.add_argument("--draft", default=None, help="--engine: draft folder (default: target)")
    ap.add_argument("--code-prompts", type=int, default=20)
    args = ap.parse_args(argv)
    if args.engine:
        return engine(args)
    if args.model is None:
        from sglang_dsde.models import ensure_target

        args.model = ensure_target()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    args.steps = args.steps[0]
    for shifted in (False, True):
        rounds = []
        for q in CHAT_QUESTIONS[:args.prompts]:
            enc = tok.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=True)
            ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
            rounds += replay(model, ids, steps=args.steps, max_new_tokens=args.max_new_tokens,
                             shifted=shifted)
        label = "draft sees sequence[1:] (SGLang)" if shifted else "draft sees the full sequence"
        print(f"{label:34s} accept length {sum(rounds) / len(rounds):.2f} over {len(rounds)} "
              f"rounds; first draft missed in {rounds.count(1)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
