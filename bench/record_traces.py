"""Record acceptance/KL traces of a workload for the simulator (temperature 0, CPU, float32).

    python bench/record_traces.py --workload chat --num-prompts 16 --max-new-tokens 64 \
        --max-steps 8 [--target DIR] [--draft DIR|cut:N|quant:BITS:GROUP] [--out FILE] \
        [--seed 0] [--measure-cost FILE [--cost-draft SPEC] [--cost-only]] [--tiny]

``--draft`` may be repeated: the target's continuation is generated once per prompt and
each draft gets its own trace file (``--out`` then names a folder).

Per prompt (``bench.workloads``, seeded) it records the target's greedy continuation and,
at every output position, the draft's acceptance run and the KL per draft position
(``sglang_dsde.sim.record``; format in ``sglang_dsde.trace`` and docs/simulator.md),
one JSONL line per prompt, appended as soon as it is done: an interrupted run resumes
where it stopped (same arguments, same file).

Models: ``--target`` defaults to the project's SmolLM2-135M-Instruct
(``python -m sglang_dsde.models prepare``). ``--draft``: a Hugging Face folder sharing the
target's tokenizer, ``cut:N`` (the target's first N layers, in memory) or
``quant:BITS:GROUP`` (the target with every linear weight fake-quantized to BITS-bit,
min/max per group of GROUP inputs: a high-agreement draft that is NOT cheaper to run, so
its cost must come from another model: ``--cost-draft``). ``--tiny`` records with two
random tiny Llamas (a smoke test; says nothing about acceptance).

``--measure-cost FILE`` also times HF forwards of the target and ``--cost-draft``
(default: the draft itself, or ``cut:2`` for a ``quant:`` draft) and writes the fitted CPU
prior (``sglang_dsde.sim.measure``) for ``bench/simulate.py --cost cpu:FILE``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.workloads import WORKLOADS, load_workload  # noqa: E402
from sglang_dsde.sim.measure import measure_cpu_prior  # noqa: E402
from sglang_dsde.sim.record import record_request  # noqa: E402
from sglang_dsde.trace import TraceWriter, make_header  # noqa: E402

TRACES = ROOT / "bench" / "results" / "traces"


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def cut_model(target, num_layers: int):
    """The target's first ``num_layers`` decoder layers + final norm + LM head (a copy)."""
    model = copy.deepcopy(target)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


@torch.no_grad()
def quantized_copy(target, bits: int, group: int):
    """The target with each ``nn.Linear`` weight fake-quantized (asymmetric min/max,
    ``bits`` bits, per group of ``group`` input columns); tied embeddings follow."""
    model = copy.deepcopy(target)
    levels = 2 ** bits - 1
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            out_f, in_f = w.shape
            g = group if in_f % group == 0 else in_f
            blocks = w.reshape(out_f, in_f // g, g)
            lo = blocks.amin(dim=-1, keepdim=True)
            scale = (blocks.amax(dim=-1, keepdim=True) - lo).clamp_min(1e-12) / levels
            w.copy_((((blocks - lo) / scale).round().clamp(0, levels) * scale + lo)
                    .reshape(out_f, in_f))
    return model


def build_draft(spec: str, target):
    """(model, name) for a draft spec (module docstring)."""
    if spec.startswith("cut:"):
        n = int(spec.split(":")[1])
        return cut_model(target, n), f"cut{n}"
    if spec.startswith("quant:"):
        _, bits, group = spec.split(":")
        return quantized_copy(target, int(bits), int(group)), f"quant{bits}g{group}"
    return load_model(spec), Path(spec).name


def default_models(args):
    if args.tiny:
        from tools.testing import make_tiny_llama

        cache = ROOT / ".cache" / "tiny"
        target = make_tiny_llama(cache / "tiny-target", num_layers=2, seed=0)
        draft = make_tiny_llama(cache / "tiny-draft", num_layers=1, seed=1)
        return str(target), args.draft or [str(draft)]
    if args.target:
        return args.target, args.draft
    from sglang_dsde.models import TARGET_NAME, default_cache

    target = ROOT / default_cache() / TARGET_NAME
    if not target.is_dir():
        sys.exit(f"record_traces: no target at {target}; run `python -m sglang_dsde.models "
                 f"prepare` or pass --target")
    return str(target), args.draft


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, default="chat")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=384)
    p.add_argument("--target", default=None)
    p.add_argument("--draft", action="append", default=None,
                   help="folder, cut:N or quant:BITS:GROUP (repeatable; default quant:4:64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="trace file (a folder with several drafts)")
    p.add_argument("--chunk", type=int, default=32, help="positions per batched rollout")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-eos-stop", action="store_true", help="always generate N tokens")
    p.add_argument("--measure-cost", default=None, metavar="FILE")
    p.add_argument("--cost-draft", default=None)
    p.add_argument("--cost-only", action="store_true", help="only --measure-cost")
    p.add_argument("--cost-repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--tiny", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from sglang_dsde.sim.record import greedy_generate

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    target_path, draft_specs = default_models(args)
    draft_specs = draft_specs or ["quant:4:64"]
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = load_model(target_path)
    target_name = Path(target_path).name
    prompts = load_workload(args.workload, args.num_prompts, seed=args.seed,
                            tokenizer=tokenizer, max_prompt_tokens=args.max_prompt_tokens)
    stop_ids = [] if args.no_eos_stop else [i for i in {tokenizer.eos_token_id} if i is not None]
    drafts = []  # (spec, model, name, writer)
    for spec in draft_specs:
        if args.cost_only:
            drafts.append((spec, *build_draft(spec, target), None))
            continue
        model, name = build_draft(spec, target)
        stem = (f"{args.workload}-{target_name}-{name}-n{args.max_new_tokens}-k{args.max_steps}"
                f"-p{args.num_prompts}-s{args.seed}.jsonl")
        if args.out and len(draft_specs) == 1 and args.out.endswith(".jsonl"):
            out = Path(args.out)
        else:
            out = (Path(args.out) if args.out else TRACES) / stem
        header = make_header(
            max_steps=args.max_steps, max_new_tokens=args.max_new_tokens, target=target_name,
            draft=name, workload=args.workload, seed=args.seed,
            stop_at_eos=not args.no_eos_stop, num_prompts=args.num_prompts,
            max_prompt_tokens=args.max_prompt_tokens, draft_spec=spec,
            kl="sglang_dsde.core.kl.kl_per_position, raw logits (T = 0)", dtype="float32",
            threads=args.threads, tool="bench/record_traces.py")
        drafts.append((spec, model, name, TraceWriter(out, header)))
    todo = [] if args.cost_only else [
        p for p in prompts if any(p.id not in w.done_ids for *_, w in drafts)]
    print(f"record_traces: {len(prompts)} {args.workload} prompts ({len(prompts) - len(todo)} "
          f"done), target {target_name}, drafts {', '.join(d[2] for d in drafts)}", flush=True)
    agree = {name: 0 for _, _, name, _ in drafts}
    total = 0
    bar = tqdm(todo, desc=f"{args.workload} traces", unit="prompt")
    for prompt in bar:
        output = greedy_generate(target, prompt.input_ids, args.max_new_tokens, stop_ids)
        total += len(output)
        for _, model, name, writer in drafts:
            if prompt.id in writer.done_ids:
                continue
            req = record_request(target, model, prompt.input_ids,
                                 max_new_tokens=args.max_new_tokens, max_steps=args.max_steps,
                                 chunk_positions=args.chunk, req_id=prompt.id,
                                 source=prompt.source, output_ids=output)
            writer.append(req)
            agree[name] += int((req.accept > 0).sum())
        bar.set_postfix(tokens=total, **{f"agree_{k}": f"{v / max(total, 1):.2f}"
                                         for k, v in agree.items()})
    if args.cost_only and not args.measure_cost:
        sys.exit("record_traces: --cost-only needs --measure-cost FILE")
    if args.measure_cost:
        first_spec, first_model, first_name, _ = drafts[0]
        cost_spec = args.cost_draft or ("cut:2" if first_spec.startswith("quant:") else None)
        cost_draft, cost_name = (build_draft(cost_spec, target) if cost_spec
                                 else (first_model, first_name))
        t0 = time.time()
        cost = measure_cpu_prior(
            target, cost_draft, name="cpu-prior",
            source=f"HF forwards, float32, {args.threads} threads: target {target_name}, "
                   f"draft {cost_name}; median of {args.cost_repeats}",
            repeats=args.cost_repeats, progress=lambda msg: print("  cost:", msg, flush=True))
        Path(args.measure_cost).parent.mkdir(parents=True, exist_ok=True)
        Path(args.measure_cost).write_text(json.dumps(cost.to_json(), indent=1) + "\n")
        print(f"record_traces: CPU prior ({time.time() - t0:.0f} s) -> {args.measure_cost}")
    for *_, writer in drafts:
        if writer is not None:
            print(f"record_traces: wrote {writer.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
