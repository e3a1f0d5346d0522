"""The online round-cost model: prior before data, exact recovery, outliers, non-negativity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sglang_dsde.core.round_cost import (MIN_SAMPLES, PRIOR_SHAPE, SOLVE_ALWAYS, SOLVE_EVERY,
                                         LinearRoundCost, OnlineRoundCost,
                                         round_feature_list, round_features, round_sample,
                                         solve_nonnegative)

TRUE = LinearRoundCost.from_parts(draft_step=(0.004, 0.0005), verify=(0.03, 0.002),
                                  spec=(0.006, 0.0003))


def feed(model, cost, points):
    for bs, k in points:
        model.observe(round_sample(bs, k, cost.round(bs, k)))


def test_every_simulated_world_has_a_non_negative_representation():
    """A world described by its physical parts (a verify charged per token) maps onto the
    one basis (per request, per drafted token of a request) with coefficients >= 0."""
    bs, k = np.array([1.0, 3.0, 8.0, 8.0]), np.array([0.0, 2.0, 0.0, 5.0])
    d0, d1, v0, v_tok, e0, e1 = 0.004, 0.0005, 0.03, 0.002, 0.006, 0.0003
    physical = k * (d0 + d1 * bs) + v0 + v_tok * bs * (k + 1) + (k > 0) * (e0 + e1 * bs)
    learner = TRUE.coefs()
    assert (learner >= 0).all()
    assert np.allclose(np.stack(round_feature_list(bs, k), axis=-1) @ learner, physical)
    assert np.allclose(round_features(bs, k) @ learner, physical)


@pytest.mark.parametrize("no_draft_per_request", [0.0, 0.011])
def test_the_price_of_drafting_at_a_larger_batch_from_the_policys_own_rounds(
        no_draft_per_request):
    """The engine's pattern: mostly no-drafting rounds at batch 1..4, drafting at batch 1
    and a few probes at batch 4. A request costs 0.015 and one more drafted token of one
    request 0.002 (a basis that charged every verified token as much as a request would
    say +39% for one draft at batch 4, against +24%); on the engine the no-drafting state
    also costs more per request (batch 1 -> 4: +54 ms at k = 0, +30 ms at k = 1)."""
    def world(bs, k):
        return (0.05 + 0.015 * bs + k * (0.008 + 0.002 * bs) + (k > 0) * 0.01
                + (k == 0) * no_draft_per_request * bs)

    model = OnlineRoundCost("cpu")
    rounds = [(b, 0) for b in (1, 2, 3, 4)] * 10 + [(1, k) for k in (1, 2, 3)] * 10
    for i in range(0, len(rounds), 8):  # probes: one round in 8
        rounds[i] = (4, 1 + (i // 8) % 2)
    for bs, k in rounds:
        model.observe(round_sample(bs, k, world(bs, k)))
    predicted = model.predict(4, 2)
    for k in (1, 2):  # within 10% after ~70 rounds (the prior still pulls a little)
        assert float(predicted[k] / predicted[0]) == pytest.approx(world(4, k) / world(4, 0),
                                                                   rel=0.1)


def test_before_any_timing_it_predicts_the_prior_shape():
    model = OnlineRoundCost("cpu")
    expected = [float(np.dot(round_feature_list(4.0, float(k)), PRIOR_SHAPE)) for k in range(6)]
    assert torch.allclose(model.predict(4, 5), torch.tensor(expected, dtype=torch.float64))


def test_recovers_a_linear_cost_from_varied_rounds():
    model = OnlineRoundCost("cpu")
    points = list(itertools.product([1, 2, 5, 8, 16], range(0, 7))) * 4
    feed(model, TRUE, points)
    for bs in (1, 8, 16):
        truth = torch.tensor([TRUE.round(bs, k) for k in range(7)], dtype=torch.float64)
        assert torch.allclose(model.predict(bs, 6), truth, rtol=0.02)


def test_one_batch_size_two_step_counts_give_that_batch_sizes_slope():
    """The policy's probes (K* +- 1) are enough to price every k at the batch size seen."""
    model = OnlineRoundCost("cpu")
    feed(model, TRUE, [(8, 3), (8, 4), (8, 2)] * 30)
    truth = torch.tensor([TRUE.round(8, k) for k in range(1, 9)], dtype=torch.float64)
    assert torch.allclose(model.predict(8, 8)[1:], truth, rtol=0.02)


def test_coefficients_are_re_solved_on_a_schedule_from_every_sample():
    """Every sample enters the sums; the solve runs at each of the first SOLVE_ALWAYS
    samples, then every SOLVE_EVERY-th, and then gives what solving every time gives."""
    scheduled, eager = OnlineRoundCost("cpu"), OnlineRoundCost("cpu")
    points = list(itertools.product([1, 3, 8], range(0, 5))) * 4
    for n, (bs, k) in enumerate(points, 1):
        before = scheduled.coefs.clone()
        sample = round_sample(bs, k, TRUE.round(bs, k) * (1 + 0.05 * np.sin(n)))
        scheduled.observe(sample)
        eager.observe(sample)
        eager.solve()
        if n <= SOLVE_ALWAYS or n % SOLVE_EVERY == 0:
            assert torch.equal(scheduled.coefs, eager.coefs), n
        else:
            assert torch.equal(scheduled.coefs, before), n
    assert len(points) > SOLVE_ALWAYS + 2 * SOLVE_EVERY


def test_a_gap_far_longer_than_a_round_is_not_learned():
    model = OnlineRoundCost("cpu")
    feed(model, TRUE, [(4, 2), (4, 3)] * MIN_SAMPLES)
    before = model.predict(4, 4).clone()
    model.observe(round_sample(4, 2, 50 * TRUE.round(4, 2)))  # a prefill or an idle period
    model.observe(round_sample(4, 3, 0.0))                     # and a nonsensical timing
    assert torch.equal(model.predict(4, 4), before)


def test_coefficients_stay_non_negative_when_the_data_would_want_less():
    # Rounds get *cheaper* with more requests: a least-squares fit wants a negative
    # per-request term; the model keeps every term >= 0 and fits the rest.
    model = OnlineRoundCost("cpu")
    for bs in (1, 2, 4, 8) * 10:
        for k in (1, 2, 3):
            model.observe(round_sample(bs, k, 0.05 + 0.01 * k - 0.002 * bs))
    assert bool((model.coefs >= 0).all())
    assert torch.isfinite(model.predict(8, 3)).all()


def _nnls_reference(gram, rhs):
    """Best feasible stationary point over all subsets of free coefficients (float64)."""
    n = rhs.shape[0]
    best, best_val = np.zeros(n), 0.0
    for mask in itertools.product([False, True], repeat=n):
        idx = [i for i in range(n) if mask[i]]
        if not idx:
            continue
        sub = np.linalg.solve(gram[np.ix_(idx, idx)], rhs[idx])
        if (sub < 0).any():
            continue
        c = np.zeros(n)
        c[idx] = sub
        val = 0.5 * c @ gram @ c - rhs @ c
        if val < best_val - 1e-12:
            best, best_val = c, val
    return best


@pytest.mark.parametrize("seed", range(8))
def test_nonnegative_solve_matches_an_exhaustive_reference(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(20, 6))
    gram = a.T @ a + 1e-3 * np.eye(6)
    rhs = a.T @ rng.normal(size=20)
    got = solve_nonnegative(torch.tensor(gram), torch.tensor(rhs)).numpy()
    ref = _nnls_reference(gram, rhs)
    objective = lambda c: 0.5 * c @ gram @ c - rhs @ c  # noqa: E731
    assert (got >= 0).all()
    assert objective(got) <= objective(ref) + 1e-9 * (1 + abs(objective(ref)))
    assert np.allclose(got, ref, atol=1e-9)


def test_catch_up_tokens_are_priced_only_when_the_round_drafts():
    cost = LinearRoundCost.from_parts(draft_step=(0.1, 0.0), verify=(1.0, 0.0),
                                      catch_up=0.01)
    assert cost.round(2, 0, catch_up=50) == cost.round(2, 0)
    assert cost.round(2, 1, catch_up=50) == pytest.approx(cost.round(2, 1) + 0.5)


def test_learns_the_price_of_a_catch_up_token_from_resuming_rounds():
    """Off runs of varying length, then a drafting round that first extends the skipped
    tokens: the model separates that price from a drafting round's own cost."""
    truth = LinearRoundCost.from_parts(draft_step=(0.004, 0.0005), verify=(0.03, 0.002),
                                       spec=(0.006, 0.0003), catch_up=0.0004)
    model = OnlineRoundCost("cpu")
    for run in [4, 9, 16, 2, 31, 7] * 6:
        for bs in (1, 3):
            model.observe(round_sample(bs, 0, truth.round(bs, 0)))
            model.observe(round_sample(bs, 2, truth.round(bs, 2, catch_up=run * bs),
                                       catch_up=run * bs))
            model.observe(round_sample(bs, 2, truth.round(bs, 2)))
    for g in (0, 30, 90):
        want = torch.tensor([truth.round(3, k, catch_up=g) for k in range(4)], dtype=torch.float64)
        assert torch.allclose(model.predict(3, 3, catch_up=g), want, rtol=0.03)


def test_the_prior_prices_a_catch_up_until_rounds_teach_it():
    """The prior's design points include a catch-up, so after timings of rounds without
    one the catch-up keeps the prior's share of the learned scale (it is not dropped to
    0 for lack of data); an off round pays none of it."""
    world = LinearRoundCost(d0=0.01, d1=0.001, dv=0.002, v0=0.04, v1=0.003, e0=0.005)
    model = OnlineRoundCost("cpu")
    for bs in (1, 2, 4, 8) * 10:
        for k in (0, 1, 2, 4):
            model.observe(round_sample(bs, k, world.round(bs, k)))
    plain, resuming = model.predict(4, 3), model.predict(4, 3, catch_up=40)
    assert resuming[0] == plain[0]
    assert ((resuming[1:] - plain[1:]) > 0.01 * plain[1:]).all(), (plain, resuming)
