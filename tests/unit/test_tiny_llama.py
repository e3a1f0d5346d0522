"""tools.testing.make_tiny_llama: offline, idempotent, shared tokenizer."""

from tools.testing import make_tiny_llama


def test_make_tiny_llama_is_idempotent_and_shares_vocab(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    t = make_tiny_llama(tmp_path / "t", num_layers=2)
    mtime = (t / "model.safetensors").stat().st_mtime_ns
    assert make_tiny_llama(tmp_path / "t", num_layers=2) == t
    assert (t / "model.safetensors").stat().st_mtime_ns == mtime
    d = make_tiny_llama(tmp_path / "d", num_layers=1, seed=1)
    tt, td = AutoTokenizer.from_pretrained(t), AutoTokenizer.from_pretrained(d)
    assert tt.get_vocab() == td.get_vocab()
    assert AutoConfig.from_pretrained(t).vocab_size == len(tt) == 300
    assert AutoConfig.from_pretrained(d).num_hidden_layers == 1
    assert "assistant" in tt.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
