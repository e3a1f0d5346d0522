"""The pure-torch ``tree_speculative_sampling_target_only``: the kernel's walk, and that a
deterministic (greedy) draft verified this way commits tokens with the target's law."""

from __future__ import annotations

import torch

from sglang_dsde.patches.cpu_verify_sampling import tree_speculative_sampling_target_only


def _chain(bs: int, n: int):
    """retrive_* of a topk-1 chain: node j's only child is j + 1."""
    index = torch.arange(bs * n, dtype=torch.int64).view(bs, n)
    next_token = torch.arange(1, n + 1, dtype=torch.int64).repeat(bs, 1)
    next_token[:, -1] = -1
    sibling = torch.full((bs, n), -1, dtype=torch.int64)
    return index, next_token, sibling


def _verify(target_probs, candidates, coins, final_coins, next_token=None):
    bs, n, _ = target_probs.shape
    index, chain_next, sibling = _chain(bs, n)
    predicts = torch.full((bs * n,), -7, dtype=torch.int32)
    accept_index = torch.full((bs, n), -1, dtype=torch.int32)
    accepted = torch.empty(bs, dtype=torch.int32)
    tree_speculative_sampling_target_only(
        predicts, accept_index, accepted, candidates, index,
        chain_next if next_token is None else next_token, sibling, coins, final_coins,
        target_probs, torch.zeros_like(target_probs))
    return predicts, accept_index, accepted


def test_accepts_while_the_coin_is_below_the_target_probability():
    probs = torch.tensor([[[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]]])
    candidates = torch.tensor([[0, 1, 2]])  # node 0 is the verified token; drafts 1, 2
    # p(1 | node 0) = 0.6 > 0.5: accept; p(2 | node 1) = 0.3 < 0.9: reject.
    predicts, accept_index, accepted = _verify(
        probs, candidates, torch.tensor([[0.5, 0.9, 0.0]]), torch.tensor([0.99]))
    assert accepted.tolist() == [1]
    assert accept_index[0, :2].tolist() == [0, 1]
    assert predicts[0] == 1
    # The replacement at node 1 is drawn from p(. | node 1) without token 2: {0: .5, 1: .2}
    # renormalised; coin 0.99 of 0.7 lands on token 1.
    assert predicts[1] == 1


def test_a_zero_probability_draft_is_never_accepted_and_a_full_chain_draws_the_bonus():
    probs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.7, 0.3, 0.0]]])
    _, _, accepted = _verify(probs, torch.tensor([[0, 2, 2]]), torch.zeros(1, 3),
                             torch.tensor([0.5]))
    assert accepted.tolist() == [0]
    predicts, _, accepted = _verify(probs, torch.tensor([[0, 1, 2]]), torch.zeros(1, 3),
                                    torch.tensor([0.8]))
    assert accepted.tolist() == [2]
    assert predicts[:3].tolist() == [1, 2, 1]  # bonus from p(. | node 2) = {0: .7, 1: .3}


def test_a_cut_chain_draws_from_the_target_at_the_cut():
    """``retrive_next_token[b, 0] = -1`` (DSDE's cut): no draft is tried; the token after
    node 0 is drawn from the whole target distribution there."""
    probs = torch.tensor([[[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]]])
    next_token = torch.tensor([[-1, -1]])
    predicts, _, accepted = _verify(probs, torch.tensor([[0, 1]]), torch.zeros(1, 2),
                                    torch.tensor([0.1]), next_token=next_token)
    assert accepted.tolist() == [0] and predicts[0] == 0
    predicts, _, _ = _verify(probs, torch.tensor([[0, 1]]), torch.zeros(1, 2),
                             torch.tensor([0.5]), next_token=next_token)
    assert predicts[0] == 1


def test_committed_tokens_follow_the_target_law():
    """The draft always proposes 1 then 3 (a greedy draft); with random coins the first
    committed token follows the target's p(x1), and, given x1 = 1 (only reached by
    accepting the draft: a rejection resamples without it), the second follows the
    target's row at node 1, p(x2 | x1 = 1)."""
    gen = torch.Generator().manual_seed(0)
    vocab, trials = 4, 40_000
    first = torch.tensor([0.1, 0.5, 0.3, 0.1])
    second_given_1 = torch.tensor([0.25, 0.25, 0.0, 0.5])
    probs = torch.stack([first, second_given_1, torch.full((vocab,), 0.25)])
    counts = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(trials // 1000):
        bs = 1000
        batch = probs.expand(bs, 3, vocab).contiguous()
        candidates = torch.tensor([0, 1, 3]).repeat(bs, 1)  # the draft proposes 1 then 3
        coins = torch.rand(bs, 3, generator=gen)
        final = torch.rand(bs, generator=gen)
        predicts, accept_index, accepted = _verify(batch, candidates, coins, final)
        tokens = predicts.view(bs, 3)[:, 0].long()
        counts += torch.bincount(tokens, minlength=vocab)
        ok = tokens == 1
        second += torch.bincount(predicts.view(bs, 3)[ok, 1].long(), minlength=vocab)
    freq = counts / counts.sum()
    assert torch.allclose(freq, first, atol=0.01), freq
    freq2 = second / second.sum()
    assert torch.allclose(freq2, second_given_1, atol=0.015), freq2
