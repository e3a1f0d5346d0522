"""Interleaved engine comparison: one contender against baselines on the same prompts, the
requests of the two servers alternating, so load drift on a shared machine hits both.

    python bench/interleaved.py --draft cut --baselines static:0
    python bench/interleaved.py --draft trained \\
        --baselines static:0 dsde-static:1 dsde-static:2 dsde-static:3 dsde-static:4

The contender under test (``--contender``, default ``goodput``) stays up for the whole run;
each baseline gets its own server in turn, alive next to it. Both first serve the
workload once (warm-up: lazy buffers, and the policy's first rounds), then ``--repeats``
passes in which every prompt goes to both servers back to back (the order alternating
per prompt), ``--concurrency`` requests at a time. Goodput = output tokens / wall seconds
of a server's requests; the ratio is contender / baseline over the same passes.

Contender specs are ``sglang_dsde.sim.contenders``' (``static:0``: no speculation,
``static:k``: SGLang's STANDALONE with k steps, a policy name: DSDE with that policy) plus
``dsde-static:k``: DSDE's static policy with k steps (the aligned draft, SGLang's
STANDALONE path otherwise). Greedy; each output is compared with the first server's.
The run's noise: each block (a prompt, or ``--concurrency`` of them) gives one ratio; the
table adds a 95% bootstrap interval of their geometric mean. Results: a markdown table on
stdout and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def server_kwargs(spec: str, draft, max_steps: int) -> dict:
    """``running_server`` arguments of a contender spec (module docstring)."""
    if spec.startswith("dsde-static:"):
        k = int(spec.split(":", 1)[1])
        return {"algorithm": "DSDE", "draft_model_path": draft, "num_steps": k,
                "extra_args": ["--dsde-policy", "static", "--dsde-max-steps", str(k)]}
    from sglang_dsde.sim.contenders import parse_contender

    return parse_contender(spec).server_kwargs(draft, max_steps=max_steps)


def run_pass(server, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             concurrency: int) -> dict:
    """Serve ``prompts`` ``concurrency`` at a time; tokens, seconds, outputs."""
    tokens, outputs = 0, []
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        for res in pool.map(lambda ids: server.generate(input_ids=list(ids),
                                                        max_new_tokens=max_new_tokens),
                            prompts):
            tokens += res["meta_info"]["completion_tokens"]
            outputs.append(res["output_ids"])
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "outputs": outputs}


def dsde_state(server) -> dict:
    for state in server.server_info().get("internal_states", []) or []:
        if "dsde" in state:
            return state["dsde"]
    return {}


def compare(resident, baseline, prompts, args) -> dict:
    """Interleaved passes of one baseline against the resident contender."""
    totals = {"resident": [0, 0.0], "baseline": [0, 0.0]}
    block_ratios: List[float] = []
    mismatches = 0
    blocks = [prompts[i:i + args.concurrency]
              for i in range(0, len(prompts), args.concurrency)]
    for rep in range(args.repeats):
        for b, block in enumerate(blocks):
            order = [("resident", resident), ("baseline", baseline)]
            if (rep + b) % 2:
                order.reverse()
            outs, rates = {}, {}
            for name, server in order:
                r = run_pass(server, block, args.max_new_tokens, args.concurrency)
                totals[name][0] += r["tokens"]
                totals[name][1] += r["seconds"]
                outs[name] = r["outputs"]
                rates[name] = r["tokens"] / r["seconds"]
            block_ratios.append(rates["resident"] / rates["baseline"])
            mismatches += sum(a != b for a, b in zip(outs["resident"], outs["baseline"]))
            print(f"  pass {rep + 1}/{args.repeats} block {b + 1}/{len(blocks)}: ratio "
                  f"{block_ratios[-1]:.3f}", flush=True)
    tps = {k: v[0] / v[1] for k, v in totals.items()}
    low, high = ratio_interval(block_ratios)
    return {"resident_tok_s": tps["resident"], "baseline_tok_s": tps["baseline"],
            "ratio": tps["resident"] / tps["baseline"],
            "block_ratio_median": statistics.median(block_ratios),
            "ratio_ci95": [low, high], "blocks": len(block_ratios),
            "block_ratios": [round(r, 4) for r in block_ratios],
            "output_mismatches": mismatches}


def ratio_interval(block_ratios: Sequence[float], draws: int = 2000) -> tuple:
    """95% bootstrap interval (seeded) of the geometric mean of the per-block ratios: how
    far the run's noise leaves the ratio uncertain."""
    import numpy as np

    logs = np.log(np.asarray(block_ratios, dtype=np.float64))
    rng = np.random.default_rng(0)
    means = logs[rng.integers(0, len(logs), (draws, len(logs)))].mean(axis=1)
    return float(np.exp(np.percentile(means, 2.5))), float(np.exp(np.percentile(means, 97.5)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contender", default="goodput")
    ap.add_argument("--baselines", nargs="+", default=["static:0"])
    ap.add_argument("--draft", default="trained", choices=("trained", "cut"))
    ap.add_argument("--draft-layers", type=int, default=2, help="layers of a cut draft")
    ap.add_argument("--workload", default="mix", choices=("chat", "code", "mix"))
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--cache", default=str(REPO / ".cache" / "models"))
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from bench.workloads import load_workload
    from sglang_dsde import models
    from tools.testing import running_server

    pair = models.prepare(Path(args.cache), draft=args.draft, draft_layers=args.draft_layers)
    tok = AutoTokenizer.from_pretrained(pair.target)
    prompts = [list(p.input_ids) for p in load_workload(
        args.workload, args.num_prompts, seed=0, tokenizer=tok,
        max_prompt_tokens=args.max_prompt_tokens)]
    common = dict(max_total_tokens=4096)
    rows: List[dict] = []
    with contextlib.ExitStack() as stack:
        resident = stack.enter_context(running_server(
            pair.target, **common, **server_kwargs(args.contender, pair.draft,
                                                   args.max_steps)))
        run_pass(resident, prompts, args.max_new_tokens, args.concurrency)  # warm-up
        for spec in args.baselines:
            with running_server(pair.target, **common,
                                **server_kwargs(spec, pair.draft, args.max_steps)) as base:
                run_pass(base, prompts, args.max_new_tokens, args.concurrency)  # warm-up
                row = {"baseline": spec, **compare(resident, base, prompts, args)}
            rows.append(row)
            print(f"{args.contender} vs {spec}: {row['resident_tok_s']:.2f} vs "
                  f"{row['baseline_tok_s']:.2f} tok/s, ratio {row['ratio']:.3f} (95% "
                  f"interval {row['ratio_ci95'][0]:.3f}-{row['ratio_ci95'][1]:.3f} over "
                  f"{row['blocks']} blocks), output mismatches {row['output_mismatches']}",
                  flush=True)
        state = dsde_state(resident)
    result = {"contender": args.contender, "draft": pair.draft_kind, "args": vars(args),
              "rows": rows, "contender_state": {k: state.get(k) for k in (
                  "batch_steps_histogram", "draft_kv", "first_draft_misses",
                  "drafted_request_rounds", "plain_off_rounds", "learned")}}
    print(f"\n| baseline | {args.contender} tok/s | baseline tok/s | ratio | 95% interval |"
          "\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['baseline']} | {r['resident_tok_s']:.2f} | {r['baseline_tok_s']:.2f} "
              f"| {r['ratio']:.3f} | {r['ratio_ci95'][0]:.3f}-{r['ratio_ci95'][1]:.3f} |")
    print(json.dumps(result["contender_state"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
