"""The batched DSDE policy: hand-computed rounds, the per-request reference, invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsde_reference import RefDSDE
from sglang_dsde.config import DSDEConfig
from sglang_dsde.core import make_policy


def dsde(max_slots=8, initial=4, **knobs):
    return make_policy(DSDEConfig(**{"policy": "dsde", **knobs}), max_slots=max_slots,
                       default_initial_steps=initial)


def step(policy, slots, drafted, accepted, kls, temps=None):
    width = max([len(k) for k in kls] + [1])
    kl = torch.zeros(len(slots), width, dtype=torch.float64)
    for i, row in enumerate(kls):
        kl[i, :len(row)] = torch.tensor(row, dtype=torch.float64)
    return policy.update(torch.tensor(slots), torch.tensor(drafted), torch.tensor(accepted),
                         req_kl=kl, req_temperature=None if temps is None else torch.tensor(temps))


def test_warmup_doubles_on_full_acceptance_and_caps_at_max_steps():
    pol = dsde(window=100, max_steps=10)
    slots = [3, 5]
    assert pol.steps_for(torch.tensor(slots)).tolist() == [4, 4]   # fresh slots: initial SL
    d = step(pol, slots, [4, 4], [4, 3], [[0.1] * 4, [0.2] * 4])
    # slot 3 accepted all 4 -> 8; slot 5 accepted 3 < 4 -> unchanged; nobody past warm-up.
    assert d.req_steps.tolist() == [8, 4] and d.cap.item() == -1 and d.batch_steps.item() == 8
    d = step(pol, slots, [8, 4], [8, 4], [[0.1] * 8, [0.2] * 4])
    assert d.req_steps.tolist() == [10, 8]                        # min(2 * 8, 10) = 10
    assert pol.steps_for(torch.tensor([5, 3, 0])).tolist() == [8, 10, 4]


def test_bounds_prediction_and_cap_by_hand():
    """window 6, decay 0.5, alpha 2, min 2, max 10, initial 4; slots 1 (a) and 6 (b).

    Round 1 (warm-up, n_seen 4 < 6): a accepts 4 >= 4 -> 8; b accepts 2 -> stays 4.
    Round 2 (both reach n_seen >= 6: bounds, then prediction):
      a: warm_kls = 4 x 0.25 + [.25 .25 .5 .25 0 0 .125 .125] -> sum 2.5, n 12,
         mean 0.2083, max 0.5; max_acc = max(4, 6) = 6;
         k_max = round(6 * (1 + 0.5 * 0.2083 / 0.5)) = round(7.25) = 7;
         k_min = clamp(ceil(0.7), 2, 7) = 2. History (last 6) ends [.., .125, .125]:
         short window (newest 2) has variance 0 -> WVIR 0 -> x 0 -> k = ceil(5 * 1 + 2) = 7.
      b: warm_kls = [.5 .5 1 1 .5 .5 .5 .5] -> mean 0.625, max 1; max_acc = 2;
         k_max = round(2 * 1.3125) = round(2.625) = 3; k_min = clamp(ceil(0.3), 2, 3) = 2;
         short window [.5, .5] -> WVIR 0 -> k = 3.
      cap = ceil((7 + 3) / 2) = 5 -> a 5, b 3; the batch drafts 5.
    Round 3 (a only; b keeps its state):
      history newest first [.125, 0, .125, .25, .125, .125], w = 1, 1/2, ..., 1/32:
      short [.125, 0]: m = 1/12, var = 1/288; long: var = 0.0043934 -> WVIR 0.790323;
      m_last = 0.625 / 5 = 0.125 -> SF = e^0.25 - 1 = 0.284025 -> x = 0.224472;
      k = max(2, ceil(5 * 0.775528 + 2)) = ceil(5.8776) = 6; cap = ceil(6) = 6.
    """
    pol = dsde(window=6, decay=0.5)
    a, b = 1, 6
    d = step(pol, [a, b], [4, 4], [4, 2], [[0.25] * 4, [0.5, 0.5, 1.0, 1.0]])
    assert d.req_steps.tolist() == [8, 4] and d.cap.item() == -1
    d = step(pol, [a, b], [8, 4], [6, 1],
             [[0.25, 0.25, 0.5, 0.25, 0, 0, 0.125, 0.125], [0.5] * 4])
    assert (pol.k_max[[a, b]].tolist(), pol.k_min[[a, b]].tolist()) == ([7, 3], [2, 2])
    assert d.req_steps.tolist() == [5, 3] and d.cap.item() == 5 and d.batch_steps.item() == 5
    d = step(pol, [a], [5], [2], [[0.125, 0.25, 0.125, 0.0, 0.125]])
    assert d.req_steps.tolist() == [6] and d.cap.item() == 6
    assert pol.steps_for(torch.tensor([b])).tolist() == [3]


def test_sampled_request_divides_mean_kl_by_temperature():
    """b's round 4 of the hand trace: history [.5 .5 .5 .75 .5 .75] -> WVIR 0.958696;
    m_last = (2/3) / T: at T = 2, SF = e^(2/3) - 1 = 0.947734, x = 0.908589 <= 1 ->
    k = ceil(1 * 0.0914 + 2) = 3; at T = 0, SF = e^(4/3) - 1 = 2.7937, x = 2.678 > 1 -> 2."""
    got = {}
    for temp in (2.0, 0.0):
        pol = dsde(window=6, decay=0.5)
        step(pol, [0], [4], [2], [[0.5, 0.5, 1.0, 1.0]])
        step(pol, [0], [4], [1], [[0.5] * 4])
        got[temp] = step(pol, [0], [3], [3], [[0.75, 0.5, 0.75]], [temp]).req_steps.item()
    assert got == {2.0: 3, 0.0: 2}


@pytest.mark.parametrize("accepted,k_max", [(1, 2), (3, 4), (5, 8)])
def test_upper_bound_rounds_half_to_even(accepted, k_max):
    """window 1: the first round ends warm-up. All KL equal -> mean / max = 1 ->
    k_max = round(accepted * 1.5): 1.5 -> 2, 4.5 -> 4, 7.5 -> 8; WVIR 0 (n = 1) -> k = k_max."""
    pol = dsde(window=1, min_steps=1)
    d = step(pol, [0], [6], [accepted], [[0.3] * 6])
    assert pol.k_max[0].item() == k_max and d.req_steps.item() == k_max == d.cap.item()


def test_lower_bound_ceil_tolerates_rounding():
    """kmin_fraction 0.7, k_max 10: 0.7 * 10 = 7.000000000000001 -> ceil 7, not 8."""
    pol = dsde(window=1, kmin_fraction=0.7)
    step(pol, [0], [10], [10], [[0.0] * 10])
    assert (pol.k_min[0].item(), pol.k_max[0].item()) == (7, 10)


def test_cap_off_and_zero_drafted_round():
    pol = dsde(window=2, batch_cap=False)
    d = step(pol, [0, 1], [2, 2], [2, 0], [[0.0, 0.0], [0.5, 0.1]])
    assert d.cap.item() == -1
    # A post-warm-up round with nothing drafted: m_last = 0 -> SF 0 -> x 0 -> k_max.
    d = step(pol, [0], [0], [0], [[]])
    assert d.req_steps.item() == pol.k_max[0].item()


def test_reset_slot_forgets_everything():
    pol = dsde(window=3)
    fresh = dsde(window=3)
    step(pol, [2, 4], [4, 4], [4, 1], [[0.3, 0.1, 0.2, 0.0], [1.0, 0.5, 0.2, 0.9]])
    pol.reset_slots(torch.tensor([2, 4]))
    for name in ("req_steps", "max_accepted", "warm_kl_sum", "warm_kl_comp", "warm_kl_max",
                 "k_min", "k_max"):
        assert torch.equal(getattr(pol, name), getattr(fresh, name)), name
    assert torch.equal(pol.history.values, fresh.history.values)
    assert torch.equal(pol.history.n_seen, fresh.history.n_seen)


# ---------------------------------------------------------------------------------------
# Batched update == per-request reference loop, and invariants, on random interleavings.

kl_value = st.one_of(st.floats(0, 3, allow_nan=False), st.sampled_from([0.0, 0.1, 0.25, 1.0]))


@st.composite
def scenarios(draw):
    max_steps = draw(st.integers(1, 12))
    min_steps = draw(st.integers(0, max_steps))
    knobs = dict(window=draw(st.integers(1, 12)), decay=draw(st.sampled_from([0.9, 0.5, 1.0])),
                 alpha=draw(st.sampled_from([2.0, 0.5])), min_steps=min_steps,
                 max_steps=max_steps, batch_cap=draw(st.booleans()),
                 initial_steps=draw(st.integers(min_steps, max_steps)))
    num_reqs = draw(st.integers(1, 6))
    slot_of = draw(st.permutations(range(16)))[:num_reqs]
    rounds = []
    for _ in range(draw(st.integers(1, 14))):
        present = draw(st.lists(st.integers(0, num_reqs - 1), min_size=1, max_size=num_reqs,
                                unique=True))
        batch = []
        for rid in present:
            drafted = draw(st.integers(0, 12))
            batch.append(dict(request=rid, drafted=drafted,
                              accepted=draw(st.integers(0, drafted)),
                              kl=draw(st.lists(kl_value, min_size=drafted, max_size=drafted)),
                              temperature=draw(st.sampled_from([0.0, 0.0, 0.7, 1.5])),
                              done=draw(st.booleans()) and draw(st.booleans())))
        rounds.append(batch)
    return knobs, slot_of, rounds


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_batched_update_equals_per_request_reference(scenario):
    knobs, slot_of, rounds = scenario
    cfg = DSDEConfig(**{"policy": "dsde", **knobs})
    pol = make_policy(cfg, max_slots=16)
    ref = RefDSDE(**knobs)
    for batch in rounds:
        slots = [slot_of[line["request"]] for line in batch]
        d = step(pol, slots, [x["drafted"] for x in batch], [x["accepted"] for x in batch],
                 [x["kl"] for x in batch], [x["temperature"] for x in batch])
        cap, want = ref.round(batch)
        got = d.req_steps.tolist()
        assert got == [want[x["request"]] for x in batch]
        assert d.cap.item() == (-1 if cap is None else cap)
        assert d.batch_steps.item() == max(got)
        # Invariants: every SL within the global bounds; capped requests are <= cap.
        assert all(cfg.min_steps <= s <= cfg.max_steps for s in got)
        if cap is not None:
            past = [s for s, x in zip(got, batch)
                    if pol.history.n_seen[slot_of[x["request"]]].item() >= cfg.window]
            assert past and all(s <= cap for s in past) and cap <= cfg.max_steps
        done = [slot_of[x["request"]] for x in batch if x["done"]]
        if done:
            pol.reset_slots(torch.tensor(done))
            assert (pol.history.n_seen[done] == 0).all()
            assert (pol.steps_for(torch.tensor(done)) == cfg.initial_steps).all()
