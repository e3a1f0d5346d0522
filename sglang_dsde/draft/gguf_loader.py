"""A llama-architecture GGUF file into a ``LlamaConfig`` and a float32 state dict.

Only the ``gguf`` package (pure Python + numpy) is needed; the tensor mapping and the
reverse of llama.cpp's rotary permutation of ``attn_q``/``attn_k`` follow transformers'
own GGUF loader, so the result is identical to ``from_pretrained(..., gguf_file=...)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of a q/k projection (rows grouped per head)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` (the inverse of :func:`reverse_permute`); used by tests."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (llama only)")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size")
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    cfg = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(g("rope.dimension_count", hidden // n_heads)),
        max_position_embeddings=int(g("context_length", 2048)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return {k: (int(v) if k.endswith("_token_id") and v is not None else v)
            for k, v in cfg.items()}


def load_gguf(path) -> tuple[dict, dict]:
    """``(config_kwargs, {hf_name: float32 numpy array})`` of a llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(Path(path)))
    cfg = read_config(reader)
    sd: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(x) for x in reversed(list(t.shape)))
        w = w.reshape(shape)
        name = t.name
        if name == "token_embd.weight":
            sd["model.embed_tokens.weight"] = w
        elif name == "output_norm.weight":
            sd["model.norm.weight"] = w
        elif name == "output.weight":
            sd["lm_head.weight"] = w
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if rest not in _LAYER_MAP:
                continue  # e.g. rope_freqs: recomputed by the model
            if rest == "attn_q.weight":
                w = reverse_permute(w, cfg["num_attention_heads"])
            elif rest == "attn_k.weight":
                w = reverse_permute(w, cfg["num_key_value_heads"])
            sd[f"model.layers.{int(i)}.{_LAYER_MAP[rest]}"] = np.ascontiguousarray(w)
    return cfg, sd


def build_model(path, dtype=None, device="cpu"):
    """A ``LlamaForCausalLM`` with the GGUF's weights (cast to ``dtype``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, sd = load_gguf(path)
    config = LlamaConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    dtype = dtype or torch.float32
    tensors = {k: torch.from_numpy(v).to(dtype) for k, v in sd.items()}
    if config.tie_word_embeddings:
        tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # non-persistent buffers (rotary inv_freq) were created on meta: rebuild them
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(device=device).eval()
