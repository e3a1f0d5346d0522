"""Grouped-query attention without repeating K/V, for batched CPU decoding.

On CPU, SDPA's flash kernel is slow for one query token and the GQA path copies K/V
``heads / kv_heads`` times per step; this plain grouped matmul avoids both (about 4x
faster batched decoding of SmolLM2-135M on 2 cores). Registered with transformers'
``AttentionInterface`` under :data:`NAME`, with the eager (additive float) mask.
"""

from __future__ import annotations

NAME = "dsde_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    import torch

    B, H, q, D = query.shape
    hkv, T = key.shape[1], key.shape[2]
    g = H // hkv
    if scaling is None:
        scaling = D ** -0.5
    qg = query.reshape(B, hkv, g * q, D)
    scores = torch.matmul(qg, key.transpose(-1, -2)).float() * scaling  # B, hkv, g*q, T
    scores = scores.view(B, hkv, g, q, T)
    if attention_mask is not None:
        m = attention_mask[:, :, :, -T:] if attention_mask.shape[-1] != T else attention_mask
        scores = scores + m.to(scores.dtype).view(m.shape[0], 1, 1, q, T)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(B, hkv, g * q, T)
    out = torch.matmul(probs, value).view(B, H, q, D).transpose(1, 2).contiguous()
    return out, None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


def use_grouped_attention(model):
    """Switch ``model`` (in place) to :func:`grouped_attention`; returns it."""
    model.set_attn_implementation(register())
    return model
