"""KL(p_target || q_draft) per drafted position against a literal float64 reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dsde.core.kl import kl_per_position

# float32 logits of magnitude ~30 give log-prob errors ~1e-6; sums over 10^4..10^5 terms
# keep the KL within these bounds of the float64 value (checked on many seeds).
RTOL, ATOL = 2e-4, 2e-5


def reference_kl(target, draft, temperature):
    """KL = max(0, sum_v p (log max(p, 1e-8) - log max(q, 1e-8))), float64, literally."""
    t, d = target.double(), draft.double()
    if temperature > 0:
        t, d = t / temperature, d / temperature
    p, q = torch.softmax(t, -1), torch.softmax(d, -1)
    kl = (p * (torch.log(p.clamp_min(1e-8)) - torch.log(q.clamp_min(1e-8)))).sum(-1)
    return max(0.0, kl.item())


def reference_entropy(draft, temperature):
    d = draft.double() / (temperature if temperature > 0 else 1.0)
    q = torch.softmax(d, -1)
    return -(torch.where(q > 0, q * torch.log(q), torch.zeros_like(q))).sum().item()


def assert_close_to_reference(kl, target, draft, num_drafted, temps):
    assert torch.isfinite(kl).all(), "NaN/inf KL"
    bs, num_pos = kl.shape
    for i in range(bs):
        for j in range(num_pos):
            want = reference_kl(target[i, j], draft[i, j], temps[i]) if j < num_drafted[i] else 0.0
            got = kl[i, j].item()
            assert abs(got - want) <= ATOL + RTOL * want, (i, j, got, want)


@pytest.mark.parametrize("vocab,scale,chunk", [(1000, 1.0, 97), (32000, 4.0, None),
                                               (4099, 12.0, 1000)])
def test_kl_matches_float64_reference_on_random_logits(vocab, scale, chunk):
    gen = torch.Generator().manual_seed(vocab)
    bs, num_pos = 3, 4
    target = torch.randn(bs, num_pos, vocab, generator=gen) * scale
    draft = target + torch.randn(bs, num_pos, vocab, generator=gen) * scale * 0.7
    temps = [0.0, 0.6, 1.7]
    num_drafted = torch.tensor([4, 2, 3])
    kl, entropy = kl_per_position(target, draft, num_drafted, torch.tensor(temps),
                                  chunk_cols=chunk, with_draft_entropy=True)
    assert kl.dtype == torch.float32 and kl.shape == (bs, num_pos)
    assert_close_to_reference(kl, target, draft, num_drafted, temps)
    for i in range(bs):
        for j in range(num_pos):
            want = reference_entropy(draft[i, j], temps[i]) if j < num_drafted[i] else 0.0
            assert entropy[i, j].item() == pytest.approx(want, rel=RTOL, abs=ATOL)


def test_greedy_uses_raw_logits_and_sampled_uses_temperature():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(1, 1, 500, generator=gen) * 3
    draft = torch.randn(1, 1, 500, generator=gen) * 3
    one = torch.tensor([1])
    greedy = kl_per_position(target, draft, one, torch.tensor([0.0])).item()
    at_one = kl_per_position(target, draft, one, torch.tensor([1.0])).item()
    hot = kl_per_position(target, draft, one, torch.tensor([4.0])).item()
    assert greedy == at_one  # T = 0 reads the logits as they are, like T = 1
    assert hot == pytest.approx(reference_kl(target[0, 0], draft[0, 0], 4.0), rel=RTOL)
    assert hot < greedy  # flattening both distributions shrinks the divergence


def test_undrafted_positions_are_zero_even_with_nan_logits():
    target = torch.randn(2, 3, 64)
    draft = torch.randn(2, 3, 64)
    target[0, 2] = float("nan")
    draft[1, 1:] = float("nan")
    kl = kl_per_position(target, draft, torch.tensor([2, 1]), torch.tensor([0.0, 0.5]))
    assert kl[0, 2] == 0 and (kl[1, 1:] == 0).all()
    assert torch.isfinite(kl).all() and (kl[0, :2] > 0).all() and kl[1, 0] > 0


def test_masked_vocabulary_entries_give_no_nan():
    """-inf logits (grammar masks) mean probability 0: no 0 * inf NaN, and the clamp
    bounds the divergence where the draft gives a target token probability 0."""
    target = torch.randn(1, 2, 300)
    draft = target.clone()
    target[0, 0, :100] = -math.inf
    draft[0, 0, :100] = -math.inf
    draft[0, 1, :150] = -math.inf
    target[0, 1, :50] = -math.inf
    draft[0, 1, 0] = 0.0
    kl = kl_per_position(target, draft, torch.tensor([2]), chunk_cols=64)
    assert torch.isfinite(kl).all()
    assert kl[0, 0] == 0.0
    assert kl[0, 1].item() == pytest.approx(reference_kl(target[0, 1], draft[0, 1], 0.0),
                                            rel=RTOL, abs=ATOL)
    assert 0 < kl[0, 1].item() <= -math.log(1e-8)


def test_bf16_inputs_and_chunking_agree():
    gen = torch.Generator().manual_seed(3)
    target = (torch.randn(2, 3, 3000, generator=gen) * 5).bfloat16()
    draft = (torch.randn(2, 3, 3000, generator=gen) * 5).bfloat16()
    nd = torch.tensor([3, 3])
    whole = kl_per_position(target, draft, nd, chunk_cols=3000)
    chunked = kl_per_position(target, draft, nd, chunk_cols=7)
    torch.testing.assert_close(whole, chunked, rtol=RTOL, atol=ATOL)
    assert_close_to_reference(whole, target.float(), draft.float(), nd, [0.0, 0.0])


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"\[bs, P, V\]"):
        kl_per_position(torch.zeros(1, 2, 8), torch.zeros(1, 2, 9), torch.tensor([2]))


logit_rows = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(target=logit_rows, seed=st.integers(0, 2**16), temp=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
       chunk=st.integers(1, 50))
def test_kl_is_nonnegative_and_zero_when_equal(target, seed, temp, chunk):
    vocab = len(target)
    t = torch.tensor(target).reshape(1, 1, vocab)
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(1, 1, vocab, generator=gen) * 10
    one = torch.tensor([1])
    temps = torch.tensor([temp])
    kl = kl_per_position(t, d, one, temps, chunk_cols=chunk)
    assert torch.isfinite(kl).all() and kl.item() >= 0.0
    assert kl.item() == pytest.approx(reference_kl(t[0, 0], d[0, 0], temp), rel=RTOL, abs=ATOL)
    assert kl_per_position(t, t.clone(), one, temps, chunk_cols=chunk).item() == 0.0


def test_temporaries_are_bounded_by_the_chunk_not_the_vocabulary():
    """No single allocation exceeds one float32 [rows, chunk] buffer; a [rows, V] one would
    be 20x larger (profiled allocations, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    rows, vocab, cols = 6, 8000, 400
    target = torch.randn(2, 3, vocab).bfloat16()
    draft = torch.randn(2, 3, vocab).bfloat16()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kl_per_position(target, draft, torch.tensor([3, 2]), torch.tensor([0.0, 1.0]),
                        chunk_cols=cols, with_draft_entropy=True)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= rows * cols * 4
