"""sglang_dsde.draft.data: batched generation (greedy = HF greedy), the teacher's hidden
states, resumable shards; the grouped-attention kernel -- on tiny random Llamas."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sglang_dsde.draft import data  # noqa: E402
from sglang_dsde.draft.fastattn import use_grouped_attention  # noqa: E402
from tools.testing import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path_factory.mktemp("m") / "t", num_layers=2)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPTS = [[5, 17, 40, 41, 9], [7, 8], [100, 3, 3, 250, 12, 13, 14, 15], [60]]


def test_batched_greedy_matches_hf_generate_and_hidden_states(tiny):
    answers, hidden = data.generate_batch(tiny, PROMPTS, max_new_tokens=12, eos_ids=[0],
                                          pad_id=0, return_hidden=True)
    for p, a, h in zip(PROMPTS, answers, hidden):
        ref = tiny.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                            eos_token_id=0, pad_token_id=0)[0, len(p):].tolist()
        assert a == ref[:len(a)]
        seq = torch.tensor([p + a])
        with torch.no_grad():
            full = tiny.model(input_ids=seq).last_hidden_state[0, :-1]
        assert h.shape == full.shape == (len(p) + len(a) - 1, 64)
        torch.testing.assert_close(h, full, atol=1e-4, rtol=1e-4)
        # the stored states rebuild the logits that chose the answer
        assert (tiny.lm_head(h[len(p) - 1:]).argmax(-1) == torch.tensor(a)).all()


def test_answers_stop_at_eos(tiny):
    first = data.generate_batch(tiny, PROMPTS, max_new_tokens=6, eos_ids=[0], pad_id=0)
    eos = first[0][2]
    stopped = data.generate_batch(tiny, PROMPTS[:1], max_new_tokens=6, eos_ids=[eos], pad_id=0)
    assert stopped[0] == first[0][:first[0].index(eos) + 1]


def test_grouped_attention_equals_sdpa(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "g", num_layers=2)
    a = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    b = use_grouped_attention(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    assert a.config.num_key_value_heads < a.config.num_attention_heads
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [0, 0, 9, 8, 7, 6, 5]])
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits
        lb = b(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(la[0], lb[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(la[1, 2:], lb[1, 2:], atol=1e-4, rtol=1e-4)
    ga = data.generate_batch(a, PROMPTS, max_new_tokens=8, eos_ids=[0], pad_id=0)
    gb = data.generate_batch(b, PROMPTS, max_new_tokens=8, eos_ids=[0], pad_id=0)
    assert ga == gb


def _prompt_set():
    ids = [t for p in PROMPTS for t in p]
    return data.PromptSet({"ids": np.asarray(ids, np.uint16),
                           "offsets": np.cumsum([0] + [len(p) for p in PROMPTS]),
                           "kind": np.asarray([0, 1, 0, 1], np.int8),
                           "split": np.asarray([0, 0, 0, 1], np.int8),
                           "names": np.asarray(["a", "b", "c", "d"])})


def test_prompt_set_and_resumable_shards(tiny, tmp_path):
    ps = _prompt_set()
    assert ps[1] == [7, 8] and ps.indices("train") == [0, 1, 2]
    assert ps.heldout_eval_indices(5, 5) == [3]
    n = data.run_generation(tiny, ps, [0, 1, 2], tmp_path, "train-greedy", batch_size=2,
                            max_new_tokens=5, eos_ids=[0], pad_id=0, save_hidden=True)
    assert n == 3
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert shards == ["train-greedy-00000.h.npy", "train-greedy-00000.npz",
                      "train-greedy-00001.h.npy", "train-greedy-00001.npz"]
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert data.run_generation(tiny, ps, [0, 1, 2], tmp_path, "train-greedy", batch_size=2,
                               max_new_tokens=5, eos_ids=[0], pad_id=0, save_hidden=True) == 3
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}  # nothing redone
    gens = data.load_generations(tmp_path, with_hidden=True)
    assert sorted(g[0] for g in gens) == [0, 1, 2]
    for pi, ans, tag, hid in gens:
        assert tag == "train-greedy" and len(hid) == len(ps[pi]) + len(ans) - 1
        h = data.hidden_from_numpy(hid)
        assert h.dtype == torch.bfloat16 and h.shape[1] == 64
    packed = data.pack_generations(tmp_path, tmp_path / "all.npz")
    out = tmp_path / "unpacked"
    assert data.unpack_generations(packed, out) == 3
    assert sorted((g[0], g[1]) for g in data.load_generations(out)) == \
        sorted((g[0], g[1]) for g in gens)


def test_tokenise_prompts_drops_long_prompts():
    class Tok:
        def apply_chat_template(self, msgs, add_generation_prompt, tokenize):
            return [1] + [ord(c) % 50 for c in msgs[0]["content"]] + [2]

        def __len__(self):
            return 300

    arr = data.tokenise_prompts([{"text": "hi", "kind": "chat", "split": "train", "id": "x"},
                                 {"text": "x" * 100, "kind": "code", "split": "heldout", "id": "y"}],
                                Tok(), max_prompt_tokens=10)
    ps = data.PromptSet(arr)
    assert len(ps) == 1 and ps[0] == [1, ord("h") % 50, ord("i") % 50, 2]
