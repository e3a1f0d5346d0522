"""KL(target || draft) distillation of small drafts that share the target's frozen
embedding / tied LM head; several drafts can train on the same batches, sharing one
teacher pass. Seeded, resumable (checkpoints), with progress output."""

from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import log


# --------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------

def init_layers(spec: str, n_target: int) -> list[int]:
    """Target layers a student starts from: ``"k6-first"`` -> 0..5, ``"k6-spread"`` ->
    evenly spaced from first to last, ``"k6-firstlast"`` -> first 4 + last 2."""
    k_part, how = spec.split("-", 1)
    k = int(k_part[1:])
    if not 1 <= k <= n_target:
        raise ValueError(f"bad student {spec!r}")
    if how == "first":
        return list(range(k))
    if how == "spread":
        if k == 1:
            return [0]
        return sorted({round(i * (n_target - 1) / (k - 1)) for i in range(k)})
    if how == "firstlast":
        n_last = max(1, k // 3)
        return list(range(k - n_last)) + list(range(n_target - n_last, n_target))
    raise ValueError(f"bad student init {spec!r}")


def frozen_shared(teacher, dtype=None) -> dict:
    """Float32 (or ``dtype``) frozen copies of the teacher's embedding and LM head (one
    tensor when tied), to share between students."""
    import torch

    dtype = dtype or torch.float32
    emb = torch.nn.Parameter(teacher.model.embed_tokens.weight.detach().to(dtype).clone(),
                             requires_grad=False)
    if teacher.config.tie_word_embeddings:
        return {"emb": emb, "head": emb}
    head = torch.nn.Parameter(teacher.lm_head.weight.detach().to(dtype).clone(), requires_grad=False)
    return {"emb": emb, "head": head}


def make_student(teacher, layer_ids: Sequence[int], *, dtype=None, shared: dict | None = None):
    """A ``LlamaForCausalLM`` with ``len(layer_ids)`` decoder layers copied from the
    teacher's, the teacher's final norm, and the teacher's embedding / LM head (frozen;
    ``shared`` from :func:`frozen_shared` lets several students use one copy)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layer_ids)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in layer_ids]
    cfg._attn_implementation = "sdpa"
    dev = teacher.model.embed_tokens.weight.device
    with torch.device("meta"):
        student = LlamaForCausalLM(cfg)
    dtype = dtype or torch.float32
    shared = shared or frozen_shared(teacher, dtype)
    sd = {}
    tsd = teacher.state_dict()
    for j, i in enumerate(layer_ids):
        pre = f"model.layers.{i}."
        for k, v in tsd.items():
            if k.startswith(pre):
                sd[f"model.layers.{j}." + k[len(pre):]] = v.detach().to(dtype).clone()
    sd["model.norm.weight"] = tsd["model.norm.weight"].detach().to(dtype).clone()
    sd["model.embed_tokens.weight"] = shared["emb"]
    sd["lm_head.weight"] = shared["head"]
    student.load_state_dict(sd, strict=True, assign=True)
    student.model.embed_tokens.weight = shared["emb"]
    student.lm_head.weight = shared["head"]
    for t in shared.values():  # load_state_dict(assign=True) copied the module's flag
        t.requires_grad_(False)
    student.model.rotary_emb = type(student.model.rotary_emb)(config=cfg).to(dev)
    return student.to(dev)


def trainable_state(student) -> dict:
    """The draft's own weights: decoder layers and final norm (not the shared embedding)."""
    return {k: v for k, v in student.state_dict().items()
            if k.startswith("model.layers.") or k == "model.norm.weight"}


def trainable_params(student):
    return [p for n, p in student.named_parameters()
            if n.startswith("model.layers.") or n == "model.norm.weight"]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

@dataclass
class Example:
    """One training sequence: token ids, the teacher's final hidden states for positions
    ``0 .. len(ids) - 2`` (bf16 bits as int16, possibly memory-mapped), and the first
    position that counts in the loss (the shared system prompt is skipped)."""
    ids: np.ndarray
    hidden: np.ndarray
    loss_start: int = 0


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    first = list(seqs[0])
    n = len(first)
    for s in seqs[1:]:
        m = 0
        while m < min(n, len(s)) and s[m] == first[m]:
            m += 1
        n = m
    return n


def build_examples(prompts, generations, max_len: int, skip_prefix: int | None = None) -> list[Example]:
    """prompt + answer (cut to ``max_len``) with the hidden-state rows from generation."""
    items = [g for g in generations if len(g) == 4]
    if skip_prefix is None:
        skip_prefix = common_prefix_len([prompts[pi] for pi, *_ in items[:200]])
    out = []
    for pi, ans, _tag, hid in items:
        ids = np.asarray(list(prompts[pi]) + list(ans), dtype=np.int64)
        if len(hid) != len(ids) - 1:
            raise ValueError(f"prompt {pi}: {len(hid)} hidden rows for {len(ids)} tokens")
        ids = ids[:max_len]
        if len(ids) < 2:
            continue
        out.append(Example(ids, hid[:len(ids) - 1], max(0, min(skip_prefix - 1, len(ids) - 2))))
    return out


def plan_train_batches(lengths: Sequence[int], tokens_per_batch: int) -> list[list[int]]:
    """Deterministic batches of similar length with ``rows * max_len <= tokens_per_batch``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        m = max(cur_max, lengths[i])
        if cur and m * (len(cur) + 1) > tokens_per_batch:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(i)
        cur_max = m
    if cur:
        batches.append(cur)
    return batches


def batch_for_step(n_batches: int, step: int, seed: int) -> int:
    """Index of the batch used at ``step``: a fresh seeded permutation every epoch."""
    epoch, j = divmod(step, n_batches)
    perm = list(range(n_batches))
    random.Random(seed * 7919 + epoch).shuffle(perm)
    return perm[j]


def collate(examples: Sequence[Example], pad_id: int):
    """``ids [B, L]`` (right-padded), ``sel [B, L]`` bool (positions in the loss; their
    target is the next token) and the teacher rows ``h_t [sel.sum(), H]`` (bf16)."""
    import torch

    from .data import hidden_from_numpy

    L = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    sel = torch.zeros((len(examples), L), dtype=torch.bool)
    rows = []
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.from_numpy(e.ids)
        sel[b, e.loss_start:n - 1] = True
        rows.append(hidden_from_numpy(e.hidden[e.loss_start:n - 1]))
    return ids, sel, torch.cat(rows, dim=0)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    students: list = field(default_factory=lambda: ["k6-first"])
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    steps: int = 1000               # ignored when a time budget sets it
    tokens_per_batch: int = 8192
    max_len: int = 512
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every_s: float = 600.0
    log_every: int = 10
    eval_every: int = 0             # steps between held-out evaluations (0: only at the end)
    calib_steps: int = 10           # time-budget mode: steps timed before fixing `steps`
    chunk_rows: int = 2048          # rows of the [rows, vocab] loss computed at once
    loss_vocab: int = 0             # >0: KL over this many most frequent tokens of the data,
                                    # the batch's next tokens and `loss_vocab_random` random
                                    # others drawn per step (0: the full vocabulary)
    loss_vocab_random: int = 4096


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def kl_and_grad(h_s, h_t, w, n_total: int, chunk_rows: int = 2048):
    """KL(softmax(h_t E^T) || softmax(h_s E^T)) summed over rows / ``n_total``, its
    gradient w.r.t. ``h_s`` (float32) and the count of rows whose argmaxes agree. ``w`` is
    the tied embedding / head ``[vocab, hidden]`` in the dtype of the products.

    The full-vocabulary logits are built ``chunk_rows`` rows at a time and the gradient
    ``(softmax_s - softmax_t) E`` is written by hand: no [rows, vocab] tensor is kept for
    autograd, so memory stays bounded on any batch size."""
    import torch

    grad = torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device)
    kl_sum = 0.0
    agree = 0
    for i in range(0, h_s.shape[0], chunk_rows):
        hs = h_s[i:i + chunk_rows]
        ht = h_t[i:i + chunk_rows]
        lt = torch.matmul(ht.to(w.dtype), w.t()).float()
        ls = torch.matmul(hs.to(w.dtype), w.t()).float()
        agree += int((lt.argmax(-1) == ls.argmax(-1)).sum())
        lse_t = torch.logsumexp(lt, -1, keepdim=True)
        lse_s = torch.logsumexp(ls, -1, keepdim=True)
        lt.sub_(lse_t)                      # log p_t
        ls.sub_(lse_s)                      # log p_s
        pt = lt.exp()
        kl_sum += float((pt * (lt - ls)).sum())
        ls.exp_().sub_(pt).div_(n_total)     # (p_s - p_t) / n
        grad[i:i + chunk_rows] = torch.matmul(ls.to(w.dtype), w).float()
        del lt, ls, pt
    return kl_sum / n_total, grad, agree


def frequent_tokens(examples: Sequence[Example], n: int, vocab: int) -> np.ndarray:
    """The ``n`` most frequent token ids of the examples (ties: smaller id first)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for e in examples:
        counts += np.bincount(e.ids, minlength=vocab)[:vocab]
    order = np.lexsort((np.arange(vocab), -counts))
    return np.sort(order[:n])


def _autocast(device_type: str, enabled: bool):
    import contextlib

    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def train(students: dict, examples: Sequence[Example], cfg: TrainConfig, ckpt_path, *,
          pad_id: int, deadline: float | None = None, bf16: bool = True,
          eval_fn=None, stop_after: int | None = None) -> dict:
    """Train the ``students`` (``{name: model}`` from :func:`make_student`, sharing one frozen
    embedding / tied head) on ``examples``; resume from ``ckpt_path`` when it exists.

    With ``deadline`` (``time.time()`` units) the number of steps is fixed after
    ``cfg.calib_steps`` timed steps so that training ends before it. ``eval_fn(students,
    step)`` (optional) runs every ``cfg.eval_every`` steps and at the end; its results go
    to the history. ``stop_after`` ends this session at that step (checkpoint saved, no
    final evaluation): a later call resumes. Returns ``{"students", "steps", "history",
    "seconds", "finished"}``."""
    import torch

    torch.manual_seed(cfg.seed)
    first = next(iter(students.values()))
    head = first.lm_head.weight
    dev = head.device
    w_head = head.detach().to(torch.bfloat16 if bf16 else head.dtype)
    opts = {}
    for name, st in students.items():
        st.train()
        kw = dict(lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, eps=1e-8)
        if dev.type == "cuda":
            kw["fused"] = True
        opts[name] = torch.optim.AdamW(trainable_params(st), **kw)

    frequent = None
    if cfg.loss_vocab and cfg.loss_vocab < w_head.shape[0]:
        frequent = torch.from_numpy(frequent_tokens(examples, cfg.loss_vocab, w_head.shape[0]))
    lengths = [len(e.ids) for e in examples]
    batches = plan_train_batches(lengths, cfg.tokens_per_batch)
    n_tok_epoch = sum(len(e.ids) - 1 - e.loss_start for e in examples)
    log(f"train: {len(examples)} sequences, {n_tok_epoch} loss positions, {len(batches)} "
        f"batches/epoch, students {list(students)}")
    step, total, history = 0, (cfg.steps if deadline is None else None), []
    ckpt_path = Path(ckpt_path) if ckpt_path else None
    if ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        for name, st in students.items():
            st.load_state_dict(ck["students"][name], strict=False)
            opts[name].load_state_dict(ck["opts"][name])
        step, total, history = ck["step"], ck["total"], ck["history"]
        log(f"train: resumed at step {step}/{total}")

    def save():
        if ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_name(ckpt_path.name + ".part")
        torch.save({"students": {n: trainable_state(s) for n, s in students.items()},
                    "opts": {n: o.state_dict() for n, o in opts.items()},
                    "step": step, "total": total, "history": history,
                    "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt_path)

    def run_eval():
        if eval_fn is None:
            return
        for st in students.values():
            st.eval()
        res = eval_fn(students, step)
        for st in students.values():
            st.train()
        history.append({"step": step, "eval": res})
        log(f"eval at step {step}: " + " | ".join(
            f"{n} agreement {r['agreement']:.4f}" for n, r in res.items()))

    t_start = time.time()
    t_calib = None
    last_ckpt = time.time()
    acc = {n: [0.0, 0, 0] for n in students}  # kl sum, agree, rows
    last_eval_step = step
    finished = True
    if step == 0 and cfg.eval_every:
        run_eval()
    while total is None or step < total:
        if stop_after is not None and step >= stop_after:
            finished = False
            break
        if total is None and time.time() > deadline:
            total = step  # the deadline passed while timing: stop here
            break
        if total is None and step == cfg.calib_steps // 2:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_calib = (time.time(), step)
        if total is None and t_calib is not None and step == t_calib[1] + cfg.calib_steps:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t_calib[0]) / cfg.calib_steps
            total = max(step + 1, step + int((deadline - time.time()) / per))
            log(f"train: {per * 1000:.0f} ms/step -> {total} steps "
                f"({total * cfg.tokens_per_batch / max(1, n_tok_epoch):.1f} epochs)")
        bi = batch_for_step(len(batches), step, cfg.seed)
        ids, sel, h_t = collate([examples[i] for i in batches[bi]], pad_id)
        ids, sel, h_t = ids.to(dev), sel.to(dev), h_t.to(dev)
        n_rows = int(sel.sum())
        w_step = w_head
        if frequent is not None:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            rnd = torch.randint(0, w_head.shape[0], (cfg.loss_vocab_random,), generator=g)
            vocab_ids = torch.unique(torch.cat([frequent, rnd, ids[:, 1:][sel[:, :-1]].cpu()]))
            vocab_ids = vocab_ids.to(dev)
            w_step = w_head[vocab_ids]
        lr = lr_at(step, cfg, total if total is not None else 10 ** 9)
        for name, st in students.items():
            opt = opts[name]
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(dev.type, bf16):
                h_s = st.model(input_ids=ids).last_hidden_state[sel]
            kl, grad_h, agree = kl_and_grad(h_s.detach(), h_t, w_step, n_rows, cfg.chunk_rows)
            opt.zero_grad(set_to_none=True)
            h_s.backward(grad_h.to(h_s.dtype))
            torch.nn.utils.clip_grad_norm_(trainable_params(st), cfg.grad_clip)
            opt.step()
            a = acc[name]
            a[0] += kl * n_rows
            a[1] += agree
            a[2] += n_rows
            del h_s, grad_h
        step += 1
        if step % cfg.log_every == 0 or step == total:
            rec = {"step": step, "lr": lr, "time": round(time.time() - t_start, 1)}
            parts = []
            for name, a in acc.items():
                rec[name] = {"kl": round(a[0] / max(1, a[2]), 4), "top1": round(a[1] / max(1, a[2]), 4)}
                parts.append(f"{name} kl {rec[name]['kl']:.3f} top1 {rec[name]['top1']:.3f}")
                acc[name] = [0.0, 0, 0]
            history.append(rec)
            el = time.time() - t_start
            log(f"train: step {step}/{total or '?'} lr {lr:.2e} {el / 60:.1f} min | " + " | ".join(parts))
        if cfg.eval_every and step - last_eval_step >= cfg.eval_every and step != total:
            run_eval()
            last_eval_step = step
        if ckpt_path is not None and time.time() - last_ckpt > cfg.ckpt_every_s:
            save()
            last_ckpt = time.time()
    if finished:
        run_eval()
    save()
    for st in students.values():
        st.eval()
    return {"students": students, "steps": step, "history": history,
            "seconds": round(time.time() - t_start, 1), "finished": finished}


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------

def export_student(student, out_dir, *, layers_per_file: int = 2, meta: dict | None = None) -> list[Path]:
    """The draft's own weights (bf16 safetensors, ``layers_per_file`` layers per file;
    the final norm goes with the last file) + ``manifest.json`` + ``draft.sha256``."""
    import torch
    from safetensors.torch import save_file

    from .prepare import write_checksums

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in trainable_state(student).items()}
    n = student.config.num_hidden_layers
    files = []
    groups = [list(range(i, min(n, i + layers_per_file))) for i in range(0, n, layers_per_file)]
    for gi, g in enumerate(groups):
        part = {k: v for k, v in sd.items()
                if k.startswith("model.layers.") and int(k.split(".")[2]) in g}
        if gi == len(groups) - 1:
            part["model.norm.weight"] = sd["model.norm.weight"]
        name = f"draft-{gi + 1:02d}-of-{len(groups):02d}.safetensors"
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        os.chmod(out_dir / name, 0o644)
        files.append(out_dir / name)
    manifest = dict(meta or {})
    manifest["num_hidden_layers"] = n
    manifest["files"] = [f.name for f in files]
    from .data import write_json
    write_json(out_dir / "manifest.json", manifest)
    write_checksums(out_dir, [f.name for f in files])
    return files
