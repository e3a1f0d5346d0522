"""sglang_dsde.draft.evaluate: the accepted-per-round simulation, summaries, and the
pair evaluation on tiny random Llamas (a model agrees with itself)."""

import json

import pytest

from sglang_dsde.draft import evaluate


def test_accepted_per_round_by_hand():
    T, F = True, False
    # k=1: rounds start at 0 (accept 1), 2 (accept 1), 4 (reject), 5 (accept 1) -> 3/4
    m = [T, T, T, T, F, T]
    assert evaluate.accepted_per_round([m], 1) == pytest.approx(3 / 4)
    # k=4: round at 0 accepts 4 (run of 4), next at 5: accepts 1 -> 5/2
    assert evaluate.accepted_per_round([m], 4) == pytest.approx(5 / 2)
    assert evaluate.accepted_per_round([[F, F, F]], 3) == 0.0
    assert evaluate.accepted_per_round([[T] * 9], 8) == pytest.approx(8.0)
    # several sequences pool their rounds
    assert evaluate.accepted_per_round([[T], [F]], 2) == pytest.approx(0.5)
    assert evaluate.accepted_per_round([], 3) == 0.0


def test_accepted_per_round_grows_with_k_and_is_bounded():
    import random

    rng = random.Random(0)
    m = [[rng.random() < 0.7 for _ in range(200)] for _ in range(5)]
    vals = [evaluate.accepted_per_round(m, k) for k in range(1, 9)]
    assert all(a <= b + 1e-12 for a, b in zip(vals, vals[1:]))
    assert all(v <= k for v, k in zip(vals, range(1, 9)))


def test_summarise_per_kind():
    s = evaluate.summarise([[True, False], [True, True, True, False]], ["chat", "code"])
    assert s["positions"] == 6 and s["agreement"] == pytest.approx(4 / 6)
    assert s["agreement_chat"] == 0.5 and s["agreement_code"] == 0.75
    assert set(s["accepted_per_round"]) == set(range(1, 9))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from tools.testing import make_tiny_llama

    d = tmp_path_factory.mktemp("pair")
    return make_tiny_llama(d / "t", num_layers=2), make_tiny_llama(d / "d", num_layers=1, seed=1)


def test_evaluate_pair_and_cost(tiny_pair):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
    d = AutoModelForCausalLM.from_pretrained(tiny_pair[1], dtype=torch.float32).eval()
    prompts = [("chat", [1, 5, 9, 12]), ("code", [1, 7, 7, 30, 31])]
    same = evaluate.evaluate_pair(t, t, prompts, max_new_tokens=6, eos_ids=[0], pad_id=0)
    assert same["agreement"] == 1.0 and same["target_self_agreement"] == 1.0
    assert same["accepted_per_round"][8] >= 5 / 2 - 1e-9  # 6 positions: one round of 6? capped
    other = evaluate.evaluate_pair(t, d, prompts, max_new_tokens=6, eos_ids=[0], pad_id=0)
    assert other["positions"] == same["positions"] and 0 <= other["agreement"] <= 1
    ms = evaluate.time_forward({"target": t, "draft": d}, cache_len=8, reps=3, warmup=1)
    assert set(ms) == {"target", "draft"} and all(v > 0 for v in ms.values())


def test_cli_on_tiny_pair(tiny_pair, tmp_path, capsys):

    cache = tmp_path / "cache"
    (cache / "dsde-data").mkdir(parents=True)
    prompts = [{"text": "hello there", "kind": "chat", "split": "heldout", "id": "a"},
               {"text": "def add(a, b):", "kind": "code", "split": "heldout", "id": "b"},
               {"text": "never used", "kind": "chat", "split": "train", "id": "c"}]
    (cache / "dsde-data" / "prompts-v1.json").write_text(json.dumps(prompts))
    out = tmp_path / "r.json"
    assert evaluate.main(["--target", str(tiny_pair[0]), "--draft", str(tiny_pair[1]),
                          "--n-chat", "4", "--n-code", "4", "--max-new", "5", "--cost-reps", "2",
                          "--cache", str(cache), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "agreement (float32" in text and "k=8:" in text and "ratio" in text
    res = json.loads(out.read_text())
    assert res["positions_chat"] > 0 and res["positions_code"] > 0
    assert set(res["cost"]) == {"float32", "bfloat16"}
