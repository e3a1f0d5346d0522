"""The CPU verify filters the target distribution as SGLang's CPU sampler does.

``_JointFilter`` (``patches/cpu_verify_sampling.py``) gives every verify row the
distribution SGLang's ``top_k_top_p_min_p_sampling_from_probs_torch`` samples from (top-k,
top-p and min-p applied jointly, renormalised).
Checked against that function run on every row, and against the sampler's own draws.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_dsde.patches.cpu_verify_sampling import _JointFilter

VOCAB = 50
TOP_K_ALL = 1 << 30  # SGLang's "no top-k"


def _info(top_ks, top_ps, min_ps):
    return SimpleNamespace(top_ks=torch.tensor(top_ks), top_ps=torch.tensor(top_ps),
                           min_ps=torch.tensor(min_ps), need_top_k_sampling=True,
                           need_top_p_sampling=True, need_min_p_sampling=True)


def _reference(probs, top_ks, top_ps, min_ps):
    """SGLang's function on every row: the filtered weights, scattered back, renormalised."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    _, kept_sorted, order, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(), top_ks, top_ps, min_ps, True, None, None, return_filtered_probs=True)
    kept = torch.zeros_like(probs).scatter_(-1, order.long(), kept_sorted)
    return kept / kept.sum(dim=-1, keepdim=True)


def test_every_row_gets_the_cpu_samplers_distribution():
    gen = torch.Generator().manual_seed(0)
    # Four requests x 3 verify rows: greedy (top_k 1), top-k, top-p + min-p, unfiltered.
    top_ks, top_ps, min_ps = [1, 5, TOP_K_ALL, TOP_K_ALL], [1.0, 1.0, 0.7, 1.0], \
        [0.0, 0.0, 0.05, 0.0]
    ndt = 3
    probs = torch.softmax(torch.randn(4 * ndt, VOCAB, generator=gen) * 2, dim=-1)
    got = _JointFilter(_info(top_ks, top_ps, min_ps), ndt).apply(probs)
    per_row = [torch.tensor(v).repeat_interleave(ndt) for v in (top_ks, top_ps, min_ps)]
    want = _reference(probs, *per_row)
    assert torch.allclose(got, want, atol=1e-6)
    assert (got[:ndt].max(dim=-1).values == 1).all()  # greedy rows are one-hot
    assert torch.allclose(got[-ndt:], probs[-ndt:], atol=1e-6)  # unfiltered rows keep their mass
    assert ((got[ndt:2 * ndt] > 0).sum(dim=-1) == 5).all()


def test_the_filtered_distribution_is_what_the_sampler_draws():
    """SGLang's sampler itself, 20,000 draws of one top-p + min-p row."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 8, generator=torch.Generator().manual_seed(1)) * 2,
                          dim=-1)
    info = _info([TOP_K_ALL], [0.8], [0.1])
    want = _JointFilter(info, 1).apply(probs)[0]
    draws = top_k_top_p_min_p_sampling_from_probs_torch(
        probs.repeat(20_000, 1), info.top_ks.repeat(20_000), info.top_ps.repeat(20_000),
        info.min_ps.repeat(20_000), True, None, None)
    freq = torch.bincount(draws.long(), minlength=8).double() / 20_000
    assert torch.allclose(freq, want.double(), atol=0.015), (freq, want)
