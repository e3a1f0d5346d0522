"""What the DSDE worker adds to a decode round, against the verify forward it rides on (CPU).

Per round the worker copies the first-draft rows in (``begin_round``), copies each draft
step's logits (``record_draft_step``), computes the KL and the policy update after verify
(``on_verify``), keeps the draft-extend rows by slot (``record_first_draft``) and reads the
decision (``next_batch_steps``). This times exactly those calls of ``DSDERuntime`` (the
code the worker runs) for a vocabulary of 49,152 (SmolLM2) and 128,256 (Llama 3), and the
verify forward of SmolLM2-135M-Instruct for the same batch (``bs x (steps + 1)`` tokens on a
128-token cache, float32, Hugging Face transformers), in one run, and reports the ratio.

    python bench/worker_overhead.py [--target DIR] [--steps 4] [--repeats 20]

Seeded; writes bench/results/worker_overhead_cpu.{md,json}. Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sglang_dsde.config import DSDEConfig
from sglang_dsde.runtime import DSDERuntime

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TARGET = Path(__file__).resolve().parents[1] / ".cache/models/SmolLM2-135M-Instruct"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def runtime_round_ms(bs: int, steps: int, vocab: int, repeats: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    runtime = DSDERuntime(DSDEConfig(policy="dsde", window=8), max_slots=bs, max_rows=bs,
                          vocab_size=vocab, initial_steps=steps)
    slots = torch.arange(bs)
    runtime.on_slots_allocated(slots)
    draft_rows = torch.randn(bs, vocab, generator=gen)
    target = torch.randn(bs * (steps + 1), vocab, generator=gen)
    accept_lens = torch.randint(1, steps + 2, (bs,), generator=gen)

    def one_round():
        runtime.next_batch_steps(slots)
        runtime.begin_round(slots, steps)
        for _ in range(steps - 1):
            runtime.record_draft_step(draft_rows, steps=steps)
        runtime.on_verify(slots, steps, target, accept_lens)
        runtime.record_first_draft(slots, draft_rows)

    return median_ms(one_round, repeats)


def verify_forward_ms(target_dir: Path, bs: int, steps: int, repeats: int, seed: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target_dir, torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    context = torch.randint(0, vocab, (bs, 128), generator=gen)
    chain = torch.randint(0, vocab, (bs, steps + 1), generator=gen)
    with torch.inference_mode():
        cache = model(context, use_cache=True).past_key_values

        def verify():
            model(chain, past_key_values=cache, use_cache=True)
            cache.crop(128)

        return median_ms(verify, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for bs in args.batch_sizes:
        print(f"[worker_overhead] bs={bs}: verify forward ...", flush=True)
        verify = (verify_forward_ms(args.target, bs, args.steps, args.repeats, args.seed)
                  if args.target.exists() else None)
        for vocab in (49152, 128256):
            print(f"[worker_overhead] bs={bs} V={vocab}: DSDE round ...", flush=True)
            dsde = runtime_round_ms(bs, args.steps, vocab, args.repeats, args.seed)
            rows.append({"bs": bs, "vocab": vocab, "steps": args.steps, "dsde_ms": dsde,
                         "smollm2_verify_ms": verify,
                         "ratio": dsde / verify if verify else None})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "worker_overhead_cpu.json").write_text(json.dumps(rows, indent=2))
    lines = ["| bs | V | DSDE worker per round (ms) | SmolLM2-135M verify forward (ms) | ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        verify = f"{r['smollm2_verify_ms']:.1f}" if r["smollm2_verify_ms"] else "n/a"
        ratio = f"{r['ratio']:.1%}" if r["ratio"] else "n/a"
        lines.append(f"| {r['bs']} | {r['vocab']} | {r['dsde_ms']:.2f} | {verify} | {ratio} |")
    table = "\n".join(lines)
    (RESULTS / "worker_overhead_cpu.md").write_text(
        f"steps {args.steps}, {args.threads} threads, median of {args.repeats}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
