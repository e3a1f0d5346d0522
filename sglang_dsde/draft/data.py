"""Prompt set (tokenised, with a disjoint held-out split) and the target's own answers.

Generation is batched (left padding, KV cache, greedy or sampled) and written in shards
named after their batch index, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import log

KINDS = ("chat", "code")
SPLITS = ("train", "heldout")


# --------------------------------------------------------------------------------------
# Prompt files
# --------------------------------------------------------------------------------------

def chat_ids(tokenizer, text: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(t) for t in out]


def tokenise_prompts(prompts: Sequence[dict], tokenizer, max_prompt_tokens: int) -> dict:
    """Arrays for :func:`save_prompts`; prompts longer than ``max_prompt_tokens`` are
    dropped (not truncated: a cut request is not a real prompt)."""
    ids, offsets, kind, split, names = [], [0], [], [], []
    for p in prompts:
        t = chat_ids(tokenizer, p["text"])
        if len(t) > max_prompt_tokens:
            continue
        ids.extend(t)
        offsets.append(len(ids))
        kind.append(KINDS.index(p["kind"]))
        split.append(SPLITS.index(p["split"]))
        names.append(p["id"])
    dt = np.uint16 if tokenizer_vocab(tokenizer) <= 65536 else np.int32
    return dict(ids=np.asarray(ids, dtype=dt), offsets=np.asarray(offsets, dtype=np.int64),
                kind=np.asarray(kind, dtype=np.int8), split=np.asarray(split, dtype=np.int8),
                names=np.asarray(names))


def tokenizer_vocab(tokenizer) -> int:
    return len(tokenizer)


def save_prompts(path, arrays: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


class PromptSet:
    """Tokenised prompts: ``ps[i]`` is a list of token ids; ``ps.split``/``ps.kind``."""

    def __init__(self, arrays: dict):
        self.ids = np.asarray(arrays["ids"])
        self.offsets = np.asarray(arrays["offsets"])
        self.kind = np.asarray(arrays["kind"])
        self.split = np.asarray(arrays["split"])
        self.names = [str(x) for x in arrays["names"]]

    @classmethod
    def load(cls, path) -> "PromptSet":
        with np.load(path, allow_pickle=False) as z:
            return cls({k: z[k] for k in z.files})

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].astype(np.int64).tolist()

    def indices(self, split: str, kind: str | None = None) -> list[int]:
        m = self.split == SPLITS.index(split)
        if kind is not None:
            m &= self.kind == KINDS.index(kind)
        return np.nonzero(m)[0].tolist()

    def heldout_eval_indices(self, n_chat: int, n_code: int) -> list[int]:
        """The first ``n_chat`` chat and ``n_code`` code held-out prompts (stable order)."""
        return self.indices("heldout", "chat")[:n_chat] + self.indices("heldout", "code")[:n_code]


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------

def generate_batch(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   eos_ids: Iterable[int], pad_id: int, do_sample: bool = False,
                   temperature: float = 1.0, generator=None, return_hidden: bool = False):
    """Continue every prompt (left-padded batch, KV cache); each answer ends at its first
    EOS (included) or after ``max_new_tokens``.

    With ``return_hidden`` also returns, per sequence, the target's final (post-norm)
    hidden states at positions ``0 .. len(prompt) + len(answer) - 2``: row ``i`` gives the
    full-vocabulary logits for token ``i + 1`` through the LM head. Returns ``answers`` or
    ``(answers, hidden)``.
    """
    import torch

    dev = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, L - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.as_tensor(sorted(set(int(e) for e in eos_ids)), device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    out_tokens, step_hidden = [], []
    with torch.inference_mode():
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        h0 = out.last_hidden_state
        logits = model.lm_head(h0[:, -1]).float()
        cache = out.past_key_values
        next_pos = pos[:, -1:] + 1
        for step in range(max_new_tokens):
            if do_sample:
                probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
            out_tokens.append(nxt)
            finished |= torch.isin(nxt, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            out = model.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                              past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            h = out.last_hidden_state[:, -1]
            if return_hidden:
                step_hidden.append(h)
            logits = model.lm_head(h).float()
            next_pos = next_pos + 1
    toks = torch.stack(out_tokens, dim=1).cpu().tolist()
    eos_set = set(int(e) for e in eos_ids)
    answers = []
    for row in toks:
        ans = []
        for t in row:
            ans.append(int(t))
            if t in eos_set:
                break
        answers.append(ans)
    if not return_hidden:
        return answers
    hs = torch.stack(step_hidden, dim=1) if step_hidden else h0[:, :0]
    hidden = []
    for b, (p, a) in enumerate(zip(prompts, answers)):
        hidden.append(torch.cat([h0[b, L - len(p):], hs[b, :len(a) - 1]], dim=0).cpu())
    return answers, hidden


def plan_batches(prompts: PromptSet, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic batches of similar prompt length (less padding)."""
    order = sorted(indices, key=lambda i: (int(prompts.offsets[i + 1] - prompts.offsets[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def hidden_to_numpy(h) -> np.ndarray:
    """A float tensor as bfloat16 bits in an int16 array (numpy has no bfloat16)."""
    import torch

    return h.to(torch.bfloat16).contiguous().view(torch.int16).numpy()


def hidden_from_numpy(a):
    import torch

    return torch.from_numpy(np.array(a, dtype=np.int16)).view(torch.bfloat16)


def run_generation(model, prompts: PromptSet, indices: Sequence[int], out_dir, tag: str, *,
                   batch_size: int, max_new_tokens: int, eos_ids, pad_id: int,
                   do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                   deadline: float | None = None, save_hidden: bool = False,
                   ordered: bool = False) -> int:
    """Generate answers for ``indices`` into ``out_dir/tag-NNNNN.npz`` shards (resumable;
    with ``save_hidden`` the target's final hidden states go to ``tag-NNNNN.h.npy``).

    Batches group prompts of similar length; ``ordered`` keeps the given order of
    ``indices`` at the batch level (so a partial run covers a random subset).
    Stops before a new batch once ``time.time() > deadline``. Returns answered prompts.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if ordered:
        chunk = batch_size * 16
        batches = []
        for i in range(0, len(indices), chunk):
            batches += plan_batches(prompts, indices[i:i + chunk], batch_size)
    else:
        batches = plan_batches(prompts, indices, batch_size)
    done = 0
    t0 = time.time()
    n_tok = 0
    for bi, batch in enumerate(batches):
        shard = out_dir / f"{tag}-{bi:05d}.npz"
        if shard.exists():
            done += len(batch)
            continue
        if deadline is not None and time.time() > deadline:
            log(f"gen {tag}: deadline reached after {bi}/{len(batches)} batches")
            break
        gen = None
        if do_sample:
            dev = next(model.parameters()).device
            gen = torch.Generator(device=dev)
            gen.manual_seed(seed * 1_000_003 + bi)
        res = generate_batch(model, [prompts[i] for i in batch], max_new_tokens=max_new_tokens,
                             eos_ids=eos_ids, pad_id=pad_id, do_sample=do_sample,
                             temperature=temperature, generator=gen, return_hidden=save_hidden)
        answers, hidden = res if save_hidden else (res, None)
        flat = np.asarray([t for a in answers for t in a], dtype=np.int32)
        offs = np.cumsum([0] + [len(a) for a in answers]).astype(np.int64)
        if hidden is not None:
            import torch as _t

            hpath = out_dir / f"{tag}-{bi:05d}.h.npy"
            tmp_h = hpath.with_name(hpath.name + ".part.npy")
            np.save(tmp_h, hidden_to_numpy(_t.cat(hidden, dim=0)))
            tmp_h.replace(hpath)
        tmp = shard.with_name(shard.name + ".part.npz")
        extra = {}
        if hidden is not None:
            extra["hidden_offsets"] = np.cumsum([0] + [len(h) for h in hidden]).astype(np.int64)
        np.savez(tmp, prompt_index=np.asarray(batch, dtype=np.int64), tokens=flat, offsets=offs,
                 **extra)
        tmp.replace(shard)
        done += len(batch)
        n_tok += len(flat)
        dt = time.time() - t0
        log(f"gen {tag}: batch {bi + 1}/{len(batches)} ({len(batch)} prompts, "
            f"{len(flat)} tokens) {n_tok / max(dt, 1e-9):.0f} tok/s")
    return done


def load_generations(out_dir, tags: Sequence[str] | None = None, with_hidden: bool = False):
    """``[(prompt_index, answer_ids, tag), ...]`` from the shards in ``out_dir``; with
    ``with_hidden`` each item has a 4th field: the (memory-mapped) hidden-state rows."""
    res = []
    for shard in sorted(Path(out_dir).glob("*.npz")):
        if shard.name.endswith(".part.npz"):
            continue
        tag = shard.name.rsplit("-", 1)[0]
        if tags is not None and tag not in tags:
            continue
        with np.load(shard) as z:
            pi, tok, off = z["prompt_index"], z["tokens"], z["offsets"]
            hoff = z["hidden_offsets"] if "hidden_offsets" in z.files else None
        hid = None
        if with_hidden:
            hpath = shard.with_name(shard.name[:-4] + ".h.npy")
            if hoff is None or not hpath.exists():
                continue
            hid = np.load(hpath, mmap_mode="r")
        for j, i in enumerate(pi.tolist()):
            ans = tok[off[j]:off[j + 1]].astype(np.int64).tolist()
            if with_hidden:
                res.append((int(i), ans, tag, hid[hoff[j]:hoff[j + 1]]))
            else:
                res.append((int(i), ans, tag))
    return res


def pack_generations(out_dir, path) -> Path:
    """All shards of ``out_dir`` in one compressed file (to ship or archive)."""
    items = load_generations(out_dir)
    tags = sorted({t for _, _, t in items})
    flat = np.asarray([t for _, a, _ in items for t in a], dtype=np.uint16)
    offs = np.cumsum([0] + [len(a) for _, a, _ in items]).astype(np.int64)
    np.savez_compressed(path, prompt_index=np.asarray([i for i, _, _ in items], dtype=np.int64),
                        tokens=flat, offsets=offs,
                        tag=np.asarray([tags.index(t) for _, _, t in items], dtype=np.int8),
                        tags=np.asarray(tags))
    return Path(path)


def unpack_generations(path, out_dir) -> int:
    """Inverse of :func:`pack_generations`: one shard per tag in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with np.load(path) as z:
        pi, tok, off, tg, tags = z["prompt_index"], z["tokens"], z["offsets"], z["tag"], z["tags"]
    for ti, tag in enumerate(tags.tolist()):
        sel = np.nonzero(tg == ti)[0]
        answers = [tok[off[j]:off[j + 1]].astype(np.int32) for j in sel]
        flat = np.concatenate(answers) if answers else np.zeros(0, np.int32)
        offs = np.cumsum([0] + [len(a) for a in answers]).astype(np.int64)
        np.savez(out_dir / f"{tag}-packed.npz", prompt_index=pi[sel], tokens=flat, offsets=offs)
    return len(pi)


def write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
