"""The CPU speculative attention routine against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_dsde.patches.cpu_spec_attention import _attend, _SpecView


def _reference(q, k, v, slots, kv_len, q_len, scale, allowed=None):
    """Plain softmax attention, one query at a time (GQA by head grouping)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    for i in range(q_len):
        pos = kv_len - q_len + i
        for h in range(heads):
            keys = k[slots[: pos + 1], h // group]
            vals = v[slots[: pos + 1], h // group]
            s = (keys @ q[i, h]) * scale
            if allowed is not None:
                s = s.masked_fill(~allowed[i, : pos + 1], -math.inf)
            out[i, h] = torch.softmax(s, 0) @ vals
    return out


@pytest.fixture
def cache():
    torch.manual_seed(0)
    pool, heads, kv_heads, d = 64, 4, 2, 8
    k = torch.randn(pool, kv_heads, d)
    v = torch.randn(pool, kv_heads, d)
    req_to_token = torch.randperm(pool)[:40].view(2, 20).to(torch.int32)
    return k, v, req_to_token, heads, kv_heads, d


def test_verify_chain_is_causal_after_the_prefix(cache):
    k, v, req_to_token, heads, kv_heads, d = cache
    q_lens, kv_lens, rows = [5, 5], [12, 9], [1, 0]
    q = torch.randn(sum(q_lens), heads, d)
    out = torch.empty_like(q)
    _attend(q, k, v, _SpecView(req_to_token, rows, kv_lens, q_lens), scaling=0.3,
            num_kv_heads=kv_heads, out=out)
    start = 0
    for row, kv_len, q_len in zip(rows, kv_lens, q_lens):
        want = _reference(q[start:start + q_len], k, v, req_to_token[row].long(), kv_len, q_len, 0.3)
        torch.testing.assert_close(out[start:start + q_len], want)
        start += q_len


def test_verify_equals_one_query_at_a_time(cache):
    """The lossless property: verifying n tokens at once = n single-token decodes."""
    k, v, req_to_token, heads, kv_heads, d = cache
    q = torch.randn(5, heads, d)
    together = torch.empty_like(q)
    _attend(q, k, v, _SpecView(req_to_token, [0], [15], [5]), scaling=0.5,
            num_kv_heads=kv_heads, out=together)
    for i in range(5):
        single = torch.empty(1, heads, d)
        _attend(q[i:i + 1], k, v, _SpecView(req_to_token, [0], [11 + i], [1]), scaling=0.5,
                num_kv_heads=kv_heads, out=single)
        torch.testing.assert_close(together[i:i + 1], single, rtol=1e-5, atol=1e-6)


def test_tree_mask_limits_draft_keys(cache):
    k, v, req_to_token, heads, kv_heads, d = cache
    n, kv_len = 4, 10
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    q = torch.randn(n, heads, d)
    out = torch.empty_like(q)
    _attend(q, k, v, _SpecView(req_to_token, [0], [kv_len], [n], tree.unsqueeze(0)),
            scaling=0.4, num_kv_heads=kv_heads, out=out)
    allowed = torch.ones(n, kv_len, dtype=torch.bool)
    allowed[:, kv_len - n:] = tree
    want = _reference(q, k, v, req_to_token[0].long(), kv_len, n, 0.4, allowed)
    torch.testing.assert_close(out, want)
