"""The closed-loop simulator: accept lengths against analytic values, scheduling rules."""

import math

import numpy as np
import pytest

from sglang_dsde.sim import LinearRoundCost, parse_contender, run_cell, simulate
from sglang_dsde.sim.contenders import build_controller, static_contenders
from sglang_dsde.sim.report import result_row
from sglang_dsde.trace import synthetic_request, synthetic_trace

UNIT = LinearRoundCost.from_parts(draft_step=(0.1, 0.01), verify=(1.0, 0.05),
                                  spec=(0.2, 0.0), prefill=(2.0, 0.01), name="unit", unit="u")


def run(requests, spec, concurrency=1, max_steps=8, log_steps=False):
    controller = build_controller(parse_contender(spec), max_steps=max_steps,
                                  max_slots=concurrency, cost=UNIT)
    return simulate(requests, controller, UNIT, concurrency=concurrency, log_steps=log_steps)


def accept_length(res):
    return result_row(res)["accept_length"]


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_full_agreement_advances_k_plus_one_per_round(k):
    n = 41
    req = synthetic_request("a", [True] * n, 8)
    res = run([req], f"static:{k}")
    rounds = math.ceil((n - 1) / (k + 1))       # token 0 comes from the prefill
    assert res.round_bs.shape[0] == rounds
    assert accept_length(res) == pytest.approx((n - 1) / rounds)
    if (n - 1) % (k + 1) == 0:   # no truncated last round: every round accepts k
        assert res.requests[0].num_accepted == (n - 1) - rounds


def test_no_agreement_is_one_token_per_round_whatever_the_sl():
    req = synthetic_request("a", [False] * 30, 8)
    for k in (0, 2, 8):
        res = run([req], f"static:{k}")
        assert accept_length(res) == 1.0 and res.round_bs.shape[0] == 29


@pytest.mark.parametrize("k,p", [(1, 0.6), (3, 0.6), (6, 0.8)])
def test_static_accept_length_matches_the_iid_expectation(k, p):
    """i.i.d. agreement p: a round yields 1 + min(run, k) tokens, E = (1 - p^(k+1)) / (1 - p)."""
    trace = synthetic_trace(4, 3000, 8, p, seed=11)
    expected = (1 - p ** (k + 1)) / (1 - p)
    assert accept_length(run(trace.requests, f"static:{k}")) == pytest.approx(expected, rel=0.03)


def test_batch_drafts_its_longest_request_and_accepts_per_request():
    # a agrees everywhere, b nowhere; static 3 for both at concurrency 2.
    a = synthetic_request("a", [True] * 9, 8)
    b = synthetic_request("b", [False] * 9, 8)
    res = run([a, b], "static:3", concurrency=2)
    # a: 8 tokens after the prefill at 4 per round = 2 rounds; b: 8 rounds of 1.
    by_id = {r.id: r for r in res.requests}
    assert by_id["a"].num_rounds == 2 and by_id["b"].num_rounds == 8
    assert res.round_bs.tolist() == [2, 2] + [1] * 6
    assert set(res.round_steps.tolist()) == {3}


def test_closed_loop_clock_and_admission():
    reqs = [synthetic_request(f"r{i}", [i % 2 == 0] * (10 + i), 8, prompt_len=5 + i)
            for i in range(5)]
    res = run(reqs, "static:2", concurrency=2, log_steps=True)
    assert res.round_bs.max() == 2
    assert sorted(r.id for r in res.requests) == sorted(r.id for r in reqs)
    # The clock is the sum of all prefills and all rounds.
    rounds = sum(UNIT.round(int(bs), int(k)) for bs, k in zip(res.round_bs, res.round_steps))
    prefills = sum(UNIT.prefill(r.prompt_len) for r in reqs)
    assert res.makespan == pytest.approx(rounds + prefills)
    # Requests 2.. join exactly when an earlier one finishes.
    finishes = sorted(r.finish_time for r in res.requests)
    joins = sorted(r.join_time for r in res.requests)
    assert joins[:2] == [0.0, UNIT.prefill(5)]
    assert all(any(abs(j - f) < 1e-12 for f in finishes) for j in joins[2:])
    assert sum(r.num_tokens for r in res.requests) == res.num_tokens == sum(
        r.num_tokens for r in reqs)
    for r in res.requests:
        assert r.first_token_time - r.join_time == pytest.approx(
            UNIT.prefill(next(q.prompt_len for q in reqs if q.id == r.id)))


def test_cell_rows_have_ratios_and_the_no_spec_baseline():
    trace = synthetic_trace(6, 60, 4, 0.7, seed=3)
    cs = static_contenders(4) + [parse_contender("dsde"), parse_contender("hindsight-greedy")]
    rows, _ = run_cell(trace.requests, cs, UNIT, concurrency=3, max_steps=4,
                       cell={"trace": "syn", "cost": "unit"})
    by = {r["contender"]: r for r in rows}
    assert by["static:0"]["speedup"] == 1.0 and by["static:0"]["accept_length"] == 1.0
    best = max((r for r in rows if r["contender"].startswith("static:")),
               key=lambda r: r["throughput"])
    assert by[best["contender"]]["vs_static_opt"] == 1.0
    assert by["oracle"]["oracle_frac"] == 1.0
    assert all(r["static_opt"] == best["contender"] for r in rows)
    assert np.isfinite([r["throughput"] for r in rows]).all()


def test_a_drafting_round_pays_the_catch_up_of_the_tokens_its_drafts_have_not_seen():
    """Aligned draft: one token per request after its prefill, one more per off round;
    the simulator charges ``c1`` per catch-up token on the round that drafts."""
    priced = LinearRoundCost.from_parts(draft_step=(0.1, 0.01), verify=(1.0, 0.05),
                                        spec=(0.2, 0.0), prefill=(2.0, 0.01), catch_up=0.5,
                                        name="priced", unit="u")
    reqs = [synthetic_request(i, [False] * 6, 8) for i in ("a", "b")]
    for k in (0, 2):
        controller = build_controller(parse_contender(f"static:{k}"), max_steps=8,
                                      max_slots=2, cost=UNIT)
        free = simulate(reqs, controller, UNIT, concurrency=2).makespan
        controller = build_controller(parse_contender(f"static:{k}"), max_steps=8,
                                      max_slots=2, cost=UNIT)
        paid = simulate(reqs, controller, priced, concurrency=2).makespan
        # static 2: the first round catches both requests up (1 token each), never again.
        assert paid - free == pytest.approx(0.0 if k == 0 else 0.5 * 2)
