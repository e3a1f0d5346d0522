"""sglang_dsde.draft.gguf_loader on a tiny GGUF written here (no download)."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from sglang_dsde.draft.gguf_loader import build_model, load_gguf, permute, reverse_permute  # noqa: E402


def test_permute_roundtrip():
    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    assert np.array_equal(reverse_permute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


def _write_tiny_gguf(path, ref):
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(cfg.vocab_size)
    w.add_eos_token_id(2)
    w.add_bos_token_id(1)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    names = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}"]
            if gg == "attn_q.weight":
                t = permute(t, cfg.num_attention_heads)
            elif gg == "attn_k.weight":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_loads_exactly(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, ref)
    got_cfg, sd = load_gguf(path)
    assert got_cfg["num_hidden_layers"] == 2 and got_cfg["num_key_value_heads"] == 2
    assert got_cfg["tie_word_embeddings"] is True and got_cfg["vocab_size"] == 64
    for k, v in ref.state_dict().items():
        if k == "lm_head.weight":
            continue
        assert np.array_equal(sd[k], v.numpy()), k
    model = build_model(path)
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
