"""The cost-aware goodput policy and its acceptance statistics, against float64 references
and in closed loop on synthetic rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sglang_dsde.config import DSDEConfig, DSDEConfigError
from sglang_dsde.core import make_policy
from sglang_dsde.core.acceptance import (EPS, PRIOR_RATE, PRIOR_WEIGHT, AcceptanceCalibration,
                                         observed_positions)
from sglang_dsde.core.policies import goodput as goodput_module
from sglang_dsde.core.policies.goodput import (HISTORY_WEIGHT, OFF_REVIEW_EVERY, PRIOR_TOKENS,
                                               RESUME_HORIZON, SWITCH_MARGIN)
from sglang_dsde.sim import simulate, synthetic_trace
from sglang_dsde.sim.contenders import build_controller, parse_contender
from sglang_dsde.core.round_cost import LinearRoundCost, catch_up_tokens, round_sample


def goodput(max_slots=8, **knobs):
    cfg = DSDEConfig(**{"policy": "goodput", "min_steps": 0, "max_steps": 6,
                        "initial_steps": 2, **knobs})
    return make_policy(cfg, max_slots=max_slots)


def test_observed_positions_stop_after_the_first_rejection():
    observed, accepted = observed_positions(torch.tensor([4, 4, 2, 0]),
                                            torch.tensor([1, 4, 0, 0]), 4)
    assert observed.tolist() == [[True, True, False, False], [True] * 4,
                                 [True, False, False, False], [False] * 4]
    assert accepted.tolist() == [[True, False, False, False], [True] * 4,
                                 [False] * 4, [False] * 4]


def test_survival_matches_a_float64_reference():
    cal = AcceptanceCalibration(3, "cpu")
    kl = torch.tensor([[0.0, 0.5, 2.0], [0.2, 0.2, 0.2]], dtype=torch.float64)
    observed, accepted = observed_positions(torch.tensor([3, 3]), torch.tensor([2, 3]), 3)
    cal.observe(kl, observed, accepted, torch.tensor([0.1, float("nan")]))
    # Reference: counts after one round, forgotten once (MEMORY), priors added on read.
    from sglang_dsde.core.acceptance import MEMORY
    obs_all = MEMORY * np.array([2.0, 2.0, 2.0])   # observed per depth, both requests
    acc_all = MEMORY * np.array([2.0, 2.0, 1.0])
    rate = (acc_all.sum() + PRIOR_WEIGHT * PRIOR_RATE) / (obs_all.sum() + PRIOR_WEIGHT)
    assert math.isclose(float(cal.rate), rate, rel_tol=1e-12)
    # Both requests count in the all-rounds profile; only request 0 had a known first
    # draft entropy (0.1): its bin's row holds its counts, with that profile as prior.
    overall = (acc_all + PRIOR_WEIGHT * rate) / (obs_all + PRIOR_WEIGHT)
    row = (MEMORY * np.array([1.0, 1.0, 0.0]) + PRIOR_WEIGHT * overall) / (
        MEMORY * np.array([1.0, 1.0, 1.0]) + PRIOR_WEIGHT)
    p = 0.3
    rho = (math.log(p) / math.log(rate)) ** HISTORY_WEIGHT
    expect_known = np.exp(rho * np.cumsum(np.log(np.clip(row, EPS, 1 - EPS))))
    expect_unknown = np.exp(rho * np.cumsum(np.log(np.clip(overall, EPS, 1 - EPS))))
    got = cal.survival(torch.tensor([p, p], dtype=torch.float64),
                       torch.tensor([0.1, float("nan")], dtype=torch.float64), 3, HISTORY_WEIGHT)
    assert np.allclose(got[0].numpy(), expect_known, rtol=1e-12)
    assert np.allclose(got[1].numpy(), expect_unknown, rtol=1e-12)


def _played(policy_name, seed, max_slots=8):
    """A policy after a few random drafting rounds over slots 1, 4, 6."""
    cfg = DSDEConfig(policy=policy_name, min_steps=0, max_steps=6, initial_steps=2)
    pol = make_policy(cfg, max_slots=max_slots)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.tensor([1, 4, 6])
    for _ in range(5):
        drafted = torch.randint(0, 7, (3,), generator=gen)
        accepted = torch.minimum(torch.randint(0, 7, (3,), generator=gen), drafted)
        kl = torch.rand(3, 6, generator=gen, dtype=torch.float64)
        pol.update(slots, drafted, accepted, req_kl=kl,
                   req_draft_entropy=torch.rand(3, 6, generator=gen, dtype=torch.float64))
        if pol.needs_round_cost:
            pol.observe_round(round_sample(3, int(drafted.max()), 0.01 + 0.002 * float(
                drafted.max())))
    if pol.needs_first_entropy:
        pol.observe_first_entropy(slots, torch.tensor([0.5, float("nan"), 2.0]))
    return pol, slots


def _tensors(obj, prefix=""):
    """Every tensor reachable from a policy's attributes (one level of sub-objects)."""
    out = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif hasattr(value, "__dict__") and not prefix and not isinstance(value, DSDEConfig):
            out.update(_tensors(value, name + "."))
    return out


@pytest.mark.parametrize("policy_name", ["goodput", "dsde", "adaedl", "static"])
def test_an_off_round_is_an_empty_round_in_fewer_operations(policy_name, monkeypatch):
    """``update_off`` (a round in which nothing was drafted) leaves every state tensor and
    the decision exactly as ``update`` with every request drafting nothing does (goodput:
    reviewing its estimates every off round, as ``update`` does)."""
    monkeypatch.setattr(goodput_module, "OFF_REVIEW_EVERY", 1)
    fast, _ = _played(policy_name, seed=5)
    full, slots = _played(policy_name, seed=5)
    for _ in range(3):
        got = fast.update_off(slots)
        none = torch.zeros(3, dtype=torch.int64)
        want = full.update(slots, none, none, req_kl=torch.full((3, 6), float("nan")),
                           req_draft_entropy=torch.zeros(3, 6, dtype=torch.float64))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    fast_state, full_state = _tensors(fast), _tensors(full)
    assert fast_state.keys() == full_state.keys()
    for name, value in fast_state.items():
        assert torch.equal(value, full_state[name]) or torch.allclose(
            value, full_state[name], rtol=0, atol=0, equal_nan=True), name


def test_off_rounds_between_reviews_hold_the_reviewed_decision(monkeypatch):
    """While off, goodput recomputes its estimates at the first off round in a row, every
    ``OFF_REVIEW_EVERY``-th after it and when the batch changed; the rounds between hold
    the reviewed step count (probes still fire), and every request's sums still fade
    each round."""
    pol, slots = _played("goodput", seed=5)
    reference, _ = _played("goodput", seed=5)
    reviews = []
    estimates = pol._estimates
    monkeypatch.setattr(pol, "_estimates", lambda s: reviews.append(len(s)) or estimates(s))
    rounds = 2 * OFF_REVIEW_EVERY + 1
    for _ in range(rounds):
        pol.update_off(slots)
        reference.update_off(slots)
    assert len(reviews) == 3  # off rounds 1, 1 + R, 1 + 2R
    for name in ("kl_sum", "obs_sum", "obs_weight"):
        assert torch.equal(getattr(pol, name), getattr(reference, name)), name
    # A request leaves: the next off round reviews (the batch changed), the one after holds.
    pol.reset_slots(slots[1:2])
    smaller = slots[[0, 2]]
    pol.update_off(smaller)
    pol.update_off(smaller)
    assert len(reviews) == 4
    # A drafting round reviews, and the next off round starts a new run of off rounds.
    two = torch.tensor([2, 2])
    pol.update(smaller, two, two, req_kl=torch.zeros(2, 6, dtype=torch.float64))
    pol.update_off(smaller)
    assert len(reviews) == 6


def test_rounds_without_an_observed_position_keep_the_calibration():
    pol, slots = _played("goodput", seed=2)
    before = {k: v.clone() for k, v in _tensors(pol.calibration).items()}
    none = torch.zeros(3, dtype=torch.int64)
    pol.update(slots, none, none, req_kl=torch.zeros(3, 6, dtype=torch.float64))
    pol.update_off(slots)
    for name, value in _tensors(pol.calibration).items():
        assert torch.equal(value, before[name]), name


def test_request_estimates_are_decayed_sums_aged_in_output_tokens():
    pol = goodput(decay=0.8, goodput_kl_weight=0.0, goodput_stability_weight=0.0)
    slot = torch.tensor([3])
    rounds = [(4, 2), (4, 4), (0, 0), (3, 0)]   # (drafted, accepted)
    ref_sum = ref_weight = 0.0
    for drafted, accepted in rounds:
        kl = torch.zeros(1, 6, dtype=torch.float64)
        pol.update(slot, torch.tensor([drafted]), torch.tensor([accepted]), req_kl=kl)
        observed = min(accepted + 1, drafted)
        outcomes = [1.0] * accepted + ([0.0] if accepted < drafted else [])
        fade = 0.8 ** (accepted + 1)
        ref_sum = fade * ref_sum + sum(0.8 ** (observed - 1 - j) * o
                                       for j, o in enumerate(outcomes))
        ref_weight = fade * ref_weight + sum(0.8 ** (observed - 1 - j)
                                             for j in range(observed))
    prior = float(pol.calibration.rate)
    expect = (ref_sum + PRIOR_TOKENS * prior) / (ref_weight + PRIOR_TOKENS)
    assert math.isclose(float(pol.acceptance_rate(slot)), expect, rel_tol=1e-12)


@pytest.mark.parametrize("state_steps", [None, [0, 1, 2, 3, 4, 5, 6]])
def test_decision_is_the_argmax_of_expected_tokens_per_cost(state_steps):
    """Among the runnable step counts (the runtime states), past the switch margin."""
    pol = goodput(goodput_probe_every=0, ragged_verify=False, state_steps=state_steps)
    gen = torch.Generator().manual_seed(1)
    slots = torch.tensor([0, 2, 5])
    for _ in range(20):
        pol.update(slots, torch.tensor([6, 3, 5]), torch.randint(0, 4, (3,), generator=gen),
                   req_kl=torch.rand(3, 6, generator=gen, dtype=torch.float64))
        pol.observe_round(round_sample(3, 5, 0.05))
    entropy = torch.tensor([0.2, 1.2, 3.5], dtype=torch.float64)
    pol.observe_first_entropy(slots, entropy)
    steps = int(pol.batch_steps_for(slots))
    surv = pol.calibration.survival(pol.acceptance_rate(slots), entropy, 6, HISTORY_WEIGHT)
    tokens = [3.0 + float(surv[:, :k].sum()) for k in range(7)]
    cost = pol.round_cost.predict(3, 6).tolist()
    choices = pol.choices.tolist()
    assert choices == (sorted(state_steps) if state_steps else [0, 1, 2, 3, 4, 6])
    rate = {k: tokens[k] / cost[k] for k in choices}
    best, held = max(choices, key=rate.get), choices[int(pol.held)]
    assert steps == (best if rate[best] > rate[held] * (1 + SWITCH_MARGIN) else held)
    assert steps in choices


def _trained(seed, **knobs):
    pol = goodput(goodput_probe_every=0, **knobs)
    gen = torch.Generator().manual_seed(seed)
    slots = torch.tensor([0, 2, 5])
    for _ in range(20):
        pol.update(slots, torch.tensor([6, 3, 5]), torch.randint(0, 4, (3,), generator=gen),
                   req_kl=torch.rand(3, 6, generator=gen, dtype=torch.float64))
        pol.observe_round(round_sample(3, 5, 0.05, int(torch.randint(3, 16, (1,), generator=gen))))
    pol.observe_first_entropy(slots, torch.tensor([0.2, 1.2, 3.5], dtype=torch.float64))
    return pol, slots


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ragged_decision_is_the_best_of_every_per_request_allocation(seed):
    """With a ragged verify the policy picks the batch's step count and every request's
    length together: the most expected tokens per unit of learned cost over all length
    vectors (brute force over (K + 1)^bs of them), every step count a runtime state here;
    the held step count stays unless the best beats it by the switch margin."""
    import itertools

    pol, slots = _trained(seed, state_steps=list(range(7)))
    lengths_seen = []
    for per_token in (0.0, 0.004, 0.02):  # a verify that costs more favours shorter lengths
        coefs = pol.round_cost.coefs.clone()
        coefs[2] = per_token                     # dv
        pol.round_cost.coefs = coefs
        steps = int(pol.batch_steps_for(slots))
        lengths = pol.steps_for(slots).tolist()
        surv = pol.survival(slots).numpy()
        base = pol.round_cost.predict(3, 6, unverified=True).numpy()

        def rate(ls):
            return (3 + sum(surv[i, :l].sum() for i, l in enumerate(ls))) / (
                base[max(ls)] + per_token * sum(ls))

        vectors = list(itertools.product(range(7), repeat=3))
        best = max(vectors, key=rate)
        held = int(pol.held)
        best_held = max((v for v in vectors if max(v) <= held), key=rate)
        want = best if rate(best) > rate(best_held) * (1 + SWITCH_MARGIN) else best_held
        assert steps == max(lengths)
        assert rate(lengths) == pytest.approx(rate(want), rel=1e-9), (lengths, want)
        lengths_seen.append(sum(lengths))
    assert lengths_seen[0] >= lengths_seen[1] >= lengths_seen[2]


def test_online_cost_tells_drafting_from_verifying_after_ragged_rounds():
    """Padded rounds cannot separate a drafted token's own cost from its verify
    (T = bs * k); rounds that verify fewer than all of them can."""
    from sglang_dsde.core.round_cost import OnlineRoundCost

    world = LinearRoundCost(d0=0.01, d1=0.001, dv=0.006, v0=0.04, v1=0.003)
    model = OnlineRoundCost("cpu")
    rng = np.random.default_rng(0)
    for _ in range(300):
        bs, k = int(rng.integers(1, 9)), int(rng.integers(0, 7))
        verified = int(rng.integers(0, bs * k + 1))
        model.observe(round_sample(bs, k, world.round(bs, k, verified), verified))
    assert float(model.per_verified_token) == pytest.approx(0.006, rel=0.05)
    base = model.predict(8, 6, unverified=True)
    want = torch.tensor([world.round(8, k, 0) for k in range(7)], dtype=torch.float64)
    assert torch.allclose(base, want, rtol=0.03)


def run_closed_loop(pol, accept_fn, cost, rounds=400, bs=4, entropy_fn=None):
    """Feed ``rounds`` rounds: accepted = accept_fn(round, steps, row); returns steps."""
    slots = torch.arange(bs)
    chosen = []
    for r in range(rounds):
        entropy = entropy_fn(r) if entropy_fn else None
        if entropy is not None:
            pol.observe_first_entropy(slots, entropy)
        k = int(pol.batch_steps_for(slots))
        chosen.append(k)
        acc = torch.tensor([accept_fn(r, k, i) for i in range(bs)])
        kl = torch.where(torch.arange(6).unsqueeze(0) < acc.unsqueeze(1), 0.01, 3.0)
        pol.update(slots, torch.full((bs,), k), acc, req_kl=kl.double())
        pol.observe_round(round_sample(bs, k, cost.round(bs, k)))
    return chosen


GPU_LIKE = LinearRoundCost.from_parts(draft_step=(0.05, 0.0), verify=(1.0, 0.005), spec=(0.05, 0.0))
DRAFT_DEAR = LinearRoundCost.from_parts(draft_step=(0.6, 0.0), verify=(1.0, 0.2), spec=(0.3, 0.0))


def test_always_accepted_cheap_drafts_grow_to_max_steps():
    chosen = run_closed_loop(goodput(), lambda r, k, i: k, GPU_LIKE)
    assert np.mean(np.array(chosen[-100:]) == 6) > 0.9


def test_never_accepted_drafts_stop_drafting_with_probes_only():
    chosen = run_closed_loop(goodput(), lambda r, k, i: 0, GPU_LIKE)
    tail = np.array(chosen[-128:])
    assert np.mean(tail == 0) > 0.9 and tail.max() <= 1


def test_probes_out_of_off_space_out_while_they_fail_and_come_back_after_a_success():
    pol = goodput(goodput_probe_every=32)
    never = run_closed_loop(pol, lambda r, k, i: 0, GPU_LIKE, rounds=800)
    # Failed probes double the period while off, up to 8 x 32 rounds.
    assert 1 <= sum(k > 0 for k in never[-512:]) <= 3
    # Drafts that start to agree: the next probe finds it, and the server drafts again.
    later = run_closed_loop(pol, lambda r, k, i: k, GPU_LIKE, rounds=600)
    assert np.mean(np.array(later[-100:]) > 0) > 0.9
    assert int(pol.off_misses.max()) == 0


def test_expensive_drafts_speculate_less_at_the_same_acceptance():
    rng = np.random.default_rng(0)
    run = np.cumprod(rng.random((400, 4, 6)) < 0.7, axis=2).sum(axis=2)  # geometric, p=0.7
    accept = lambda r, k, i: int(min(run[r, i], k))  # noqa: E731
    cheap = np.mean(run_closed_loop(goodput(), accept, GPU_LIKE)[-200:])
    dear = np.mean(run_closed_loop(goodput(), accept, DRAFT_DEAR)[-200:])
    assert cheap > dear + 1


def test_confident_first_drafts_get_longer_rounds():
    # Rounds alternate: low first-draft entropy -> everything accepted; high -> nothing.
    entropy = lambda r: torch.full((4,), 0.1 if r % 2 else 4.5, dtype=torch.float64)  # noqa
    accept = lambda r, k, i: k if r % 2 else 0  # noqa: E731
    chosen = np.array(run_closed_loop(goodput(), accept, GPU_LIKE, entropy_fn=entropy))
    odd, even = chosen[201::2], chosen[200::2]
    # (The request history, a blend of both kinds of rounds, pulls the two apart less
    # than the entropy alone would: a hesitant round still drafts long now and then.)
    assert odd.mean() > 5 and even.mean() < odd.mean() - 2 and np.mean(even == 0) > 0.3


def test_exploration_probes_one_step_either_side_of_the_estimate():
    pol = goodput(goodput_probe_every=8, state_steps=[0, 1, 2, 3, 4, 5, 6])
    chosen = run_closed_loop(pol, lambda r, k, i: min(k, 3), GPU_LIKE, rounds=200)
    tail = np.array(chosen[-64:])
    held = int(np.bincount(tail).argmax())
    assert held == 3 and np.bincount(tail).max() >= 0.75 * len(tail)  # the estimate
    assert {held - 1, held + 1} <= set(tail.tolist())  # probes on both sides
    # One probe per period (2 switches per 8 rounds), and the estimate's own drift: the
    # never-observed depths fade back toward the prior until a round tries them.
    assert sum(a != b for a, b in zip(tail, tail[1:])) <= 24


def test_a_batch_size_never_played_is_explored_like_a_young_server():
    """Costs depend on the batch size: 200 rounds at batch 1 leave batch 4 (another size
    class) with the frequent early probes, while batch 1 probes once in 32."""
    def probes_in(pol, bs, rounds):
        chosen = run_closed_loop(pol, lambda r, k, i: 0, GPU_LIKE, rounds=rounds, bs=bs)
        return sum(k > 0 for k in chosen)

    pol = goodput(goodput_probe_every=32)
    probes_in(pol, 1, 200)
    assert probes_in(pol, 1, 24) <= 1          # batch 1 is old: one probe in 32 at most
    assert probes_in(pol, 4, 24) >= 4          # batch 4 is new: periods 2, 3, 4, ...


def test_reset_returns_a_slot_to_the_server_prior():
    pol = goodput()
    slot = torch.tensor([1])
    for _ in range(5):
        pol.update(slot, torch.tensor([6]), torch.tensor([6]),
                   req_kl=torch.zeros(1, 6, dtype=torch.float64))
    assert float(pol.acceptance_rate(slot)) > float(pol.calibration.rate)
    pol.reset_slots(slot)
    assert math.isclose(float(pol.acceptance_rate(slot)), float(pol.calibration.rate),
                        rel_tol=1e-12)


def test_per_request_cut_is_refused_with_the_goodput_policy():
    with pytest.raises(DSDEConfigError, match="--dsde-per-request-cut.*goodput"):
        DSDEConfig(policy="goodput", per_request_cut=True)


def test_simulated_goodput_stops_drafting_where_no_length_pays():
    """Low agreement, expensive verify: the paper's floor of 2 loses; goodput does not."""
    trace = synthetic_trace(8, 96, 6, agree_prob=0.2, seed=0)
    cost = LinearRoundCost.from_parts(draft_step=(0.3, 0.0), verify=(1.0, 0.25), spec=(0.2, 0.0))

    def throughput(spec):
        ctl = build_controller(parse_contender(spec), max_steps=6, max_slots=2, cost=cost)
        res = simulate(trace.requests, ctl, cost, concurrency=2)
        return res.num_tokens / res.makespan

    no_spec = throughput("static:0")
    assert throughput("goodput") > 0.93 * no_spec
    assert throughput("dsde") < 0.85 * no_spec


@pytest.mark.parametrize("spec", ["goodput", "goodput-padded"])
def test_acceptance_estimates_stay_unbiased_when_verifies_are_ragged(spec):
    """A ragged verify observes each request only as deep as its own length (a request
    judged poor is cut short), so its signal is censored by the policy's own choices. On a
    synthetic trace whose requests accept i.i.d. with known rates (0.85 and 0.35), each
    request's observed acceptance, and so its estimate, stays near its true rate. (The
    trace carries no first-draft entropy: an entropy that foretells the first draft's fate
    selects which rounds get observed, docs/goodput.md "Ragged verify".)"""
    from sglang_dsde.sim import PolicyController
    from sglang_dsde.sim.contenders import contender_config
    from sglang_dsde.trace import synthetic_request

    rng = np.random.default_rng(7)
    rates = {f"r{i}": (0.85 if i % 2 else 0.35) for i in range(8)}
    reqs = [synthetic_request(rid, rng.random(400) < p, 6) for rid, p in rates.items()]
    for req in reqs:
        req.draft_entropy = None
    seen = {}

    class Recording(PolicyController):
        def observe(self, batch, req_drafted, req_accepted):
            super().observe(batch, req_drafted, req_accepted)
            slots = self._slots(batch)
            pol = self.policy
            for r, obs, w in zip(batch, pol.obs_sum[slots].tolist(),
                                 pol.obs_weight[slots].tolist()):
                if w > 3:  # enough decayed weight to read a rate from
                    seen.setdefault(r.trace.id, []).append(obs / w)

    cost = LinearRoundCost.from_parts(draft_step=(0.08, 0.0), verify=(1.0, 0.06))
    controller = Recording(contender_config(parse_contender(spec), 6), max_slots=4)
    simulate(reqs, controller, cost, concurrency=4)
    for p in (0.85, 0.35):
        estimates = [np.mean(seen[rid]) for rid, q in rates.items() if q == p and rid in seen]
        assert estimates and abs(np.mean(estimates) - p) < 0.06, (p, estimates)


def _reference_probe(num_rounds, choice, misses, probe_every, last, has_off=True):
    """The probe schedule in plain Python: ``(step count index, probe up?)``."""
    full = max(probe_every, 2)
    period = min(2 + num_rounds // 4, full)
    if has_off and choice == 0 and period == full and misses:
        period = (period << min(misses, 3)) | 1
    if num_rounds % period:
        return choice, False
    up = ((num_rounds // period) % 2 == 0 or choice == 0) and choice < last
    return (choice + 1 if up else max(choice - 1, 0)), up


def test_the_probe_schedule_matches_a_reference():
    pol = goodput(goodput_probe_every=8)
    last = pol.choices.shape[0] - 1
    for num_rounds in range(0, 400, 1):
        for choice in (0, 1, last):
            for misses in (0, 1, 2, 5):
                pol.rounds_by_bs_class[0] = num_rounds
                pol.off_misses[0] = misses
                got, up = pol._probed(torch.tensor(choice), 1)
                want = _reference_probe(num_rounds, choice, misses, 8, last)
                assert (int(got), bool(up) if up is not None else False) == want, \
                    (num_rounds, choice, misses)


def test_drafting_resumes_after_a_long_off_run_once_the_draft_agrees():
    """A long off run (the draft disagrees, probes back off) owes a growing catch-up; once
    the draft agrees, the probes find it and the server drafts again. Decisions lag one
    round, as under the overlap scheduler: each round runs the step count decided at the
    end of the one before."""
    pol = goodput(goodput_probe_every=8)
    cost = LinearRoundCost.from_parts(draft_step=(0.05, 0.0), verify=(1.0, 0.005),
                                      spec=(0.05, 0.0), catch_up=0.01)
    bs, gap, k, chosen = 4, 1, 2, []
    slots = torch.arange(bs)
    for r in range(2600):
        pending = catch_up_tokens([gap] * bs)
        pol.observe_pending_catch_up(pending)
        chosen.append(k)
        if k == 0:
            decision = pol.update_off(slots)
            pol.observe_round(round_sample(bs, 0, cost.round(bs, 0)))
            gap += 1
        else:
            acc = torch.full((bs,), k if r >= 1000 else 0)
            kl = torch.where(torch.arange(6).unsqueeze(0) < acc.unsqueeze(1), 0.01, 3.0)
            decision = pol.update(slots, torch.full((bs,), k), acc, req_kl=kl.double())
            pol.observe_round(round_sample(bs, k, cost.round(bs, k, catch_up=pending),
                                           catch_up=pending))
            gap = 0
        k = int(decision.batch_steps)
    assert np.mean(np.array(chosen[500:1000]) == 0) > 0.9   # off while it disagrees
    assert np.mean(np.array(chosen[-200:]) > 0) > 0.9       # drafting again after


def test_the_pending_catch_up_is_a_debt_spread_over_the_off_run():
    """Resuming is priced with the pending catch-up divided by the off run's length (at
    least ``RESUME_HORIZON`` rounds); a drafting round pays it."""
    pol = goodput(ragged_verify=False)
    slots = torch.tensor([1, 4, 6])
    for run in (3, 40):
        for _ in range(run):
            pol.update_off(slots)
        pol.observe_pending_catch_up(500.0)
        survival = pol.survival(slots).sum(dim=0).cumsum(dim=0)
        tokens = 3 + torch.cat([torch.zeros(1, dtype=torch.float64), survival])
        cost = pol.round_cost.predict(3, 6, catch_up=500.0 / max(RESUME_HORIZON, run))
        assert torch.allclose(pol.expected_rates(slots), tokens / cost, rtol=1e-12)
        two = torch.full((3,), 2)
        pol.update(slots, two, two, req_kl=torch.zeros(3, 6, dtype=torch.float64))
        assert pol.pending_catch_up == 0.0
