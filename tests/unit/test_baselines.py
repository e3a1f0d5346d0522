"""Baseline policies and the registry: static, SGLang's adaptive rule, AdaEDL-style."""

import json
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_dsde.config import POLICY_CHOICES, DSDEConfig
from sglang_dsde.core import POLICIES, make_policy


def test_registry_matches_config_choices_and_needs_an_initial_sl():
    assert sorted(POLICIES) == sorted(POLICY_CHOICES)
    for name in POLICY_CHOICES:
        pol = make_policy(DSDEConfig(policy=name), max_slots=4, default_initial_steps=3)
        assert pol.name == name and pol.steps_for(torch.tensor([0, 3])).tolist() == [3, 3]
    with pytest.raises(ValueError, match="no initial SL"):
        make_policy(DSDEConfig(), max_slots=4)
    with pytest.raises(ValueError, match=r"initial SL = 11: expected an integer in \[min_steps=2"):
        make_policy(DSDEConfig(policy="dsde"), max_slots=4, default_initial_steps=11)
    pol = make_policy(DSDEConfig(initial_steps=6), max_slots=4, default_initial_steps=3)
    assert pol.steps_for(torch.tensor([1])).tolist() == [6]   # the knob wins


def test_static_policy_never_moves():
    pol = make_policy(DSDEConfig(policy="static"), max_slots=4, default_initial_steps=5)
    d = pol.update(torch.tensor([0, 2]), torch.tensor([5, 5]), torch.tensor([5, 0]))
    assert d.req_steps.tolist() == [5, 5] and d.batch_steps.item() == 5 and d.cap.item() == -1


# ---------------------------------------------------------------------------------------
# sglang_adaptive against SGLang's own AdaptiveSpeculativeParams.

tier_entry = st.fixed_dictionaries({
    "candidate_steps": st.lists(st.integers(0, 8), min_size=1, max_size=5, unique=True),
    "up_hysteresis": st.sampled_from([0.0, 0.25, -0.25]),
    "down_hysteresis": st.sampled_from([0.0, -0.25, 0.5]),
    "ceiling_coeff": st.sampled_from([0, 0, 0.8, 1.5]),
    "warmup_batches": st.integers(0, 3),
    "update_interval": st.integers(1, 3),
})


@settings(max_examples=60, deadline=None)
@given(tiers=st.one_of(st.none(), st.dictionaries(st.sampled_from([1, 2, 4, 8]), tier_entry,
                                                  min_size=1, max_size=3)),
       initial=st.integers(0, 8),
       batches=st.lists(st.lists(st.integers(0, 8), min_size=1, max_size=10), min_size=1,
                        max_size=40))
def test_sglang_adaptive_mirrors_sglang(tiers, initial, batches):
    sglang_params = pytest.importorskip("sglang.srt.speculative.adaptive_spec_params")
    if tiers is None:
        theirs = sglang_params.AdaptiveSpeculativeParams(initial)
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump({str(bs): entry for bs, entry in tiers.items()}, fh)
        try:
            theirs = sglang_params.AdaptiveSpeculativeParams(initial, cfg_path=fh.name)
        finally:
            os.unlink(fh.name)
    # Every step count SGLang's tiers may choose has a runtime state here.
    cfg = DSDEConfig(policy="sglang_adaptive", min_steps=0, max_steps=8,
                     state_steps=list(range(9)))
    ours = make_policy(cfg, max_slots=16, default_initial_steps=initial, tiers=tiers)
    for accepted in batches:
        bs = len(accepted)
        slots = torch.arange(bs)
        assert ours.steps_for(slots).tolist() == [theirs.get_steps_for_batch(bs)] * bs
        d = ours.update(slots, torch.full((bs,), 8), torch.tensor(accepted))
        theirs.on_verify_complete(accepted, bs)
        assert d.req_steps.tolist() == [theirs.get_steps_for_batch(bs)] * bs
        assert d.cap.item() == -1
        for other in (1, 5, 9, 33, 64):
            assert ours.steps_for(torch.arange(other))[0].item() == theirs.get_steps_for_batch(other)


def test_sglang_adaptive_ceiling_lowers_a_step_that_did_not_rise():
    """Tier [0, 2], ceiling_coeff 0.8, initial 2: EMA starts at 1.0 and stays 1.0 after a
    batch accepting 1; no threshold moves it (down needs <= 0.5; 2 is the top), but the
    ceiling max(1, ceil(0.8)) = 1 < 2 pulls it to the largest candidate <= 1, i.e. 0."""
    tiers = {1: dict(candidate_steps=[0, 2], ceiling_coeff=0.8, warmup_batches=0,
                     update_interval=1)}
    cfg = DSDEConfig(policy="sglang_adaptive", min_steps=0)
    pol = make_policy(cfg, max_slots=1, default_initial_steps=2, tiers=tiers)
    d = pol.update(torch.tensor([0]), torch.tensor([2]), torch.tensor([1]))
    assert d.req_steps.tolist() == [0] and pol.tier_ema[0].item() == 1.0


def test_sglang_adaptive_snaps_candidates_to_the_runtime_states():
    pol = make_policy(DSDEConfig(policy="sglang_adaptive", min_steps=2), max_slots=64,
                      default_initial_steps=3)
    # States 2 3 4 6 10: tier 1 [1, 3, 5, 7] -> [2, 3, 4, 6]; tier 64 [0] -> [2].
    assert pol.tiers[0].candidates == [2, 3, 4, 6] and pol.tiers[-1].candidates == [2]
    assert pol.steps_for(torch.arange(1)).tolist() == [3]
    assert pol.steps_for(torch.arange(64)).tolist() == [2] * 64


# ---------------------------------------------------------------------------------------
# AdaEDL-style draft-entropy rule.

def test_adaedl_stops_at_first_low_bound_and_probes_when_all_pass():
    """gamma 0.5, lambda 0.5: bound = 1 - sqrt(0.5 H) >= 0.5  <=>  H <= 0.5."""
    cfg = DSDEConfig(policy="adaedl", adaedl_ema=0.0, min_steps=1, max_steps=8)
    pol = make_policy(cfg, max_slots=4, default_initial_steps=4)
    entropy = torch.tensor([[0.1, 0.2, 0.9, 0.1], [0.1, 0.1, 0.1, 0.1], [2.0, 0.0, 0.0, 0.0]])
    d = pol.update(torch.tensor([0, 1, 2]), torch.tensor([4, 4, 4]), torch.tensor([2, 4, 0]),
                   req_draft_entropy=entropy)
    # slot 0 passes 2 positions then fails -> 2; slot 1 passes all 4 -> probe 5;
    # slot 2 fails at once -> 0, clamped to min_steps 1.
    assert d.req_steps.tolist() == [2, 5, 1] and d.batch_steps.item() == 5
    with pytest.raises(ValueError, match="draft_entropy"):
        pol.update(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]))


def test_adaedl_calibration_drafts_further_when_acceptance_beats_the_bound():
    cfg = DSDEConfig(policy="adaedl", adaedl_ema=0.5, min_steps=1, max_steps=10)
    pol = make_policy(cfg, max_slots=2, default_initial_steps=4)
    entropy = torch.tensor([[0.6, 0.6, 0.6, 0.6]])   # bound 0.452 < 0.5: stops at once
    first = pol.update(torch.tensor([0]), torch.tensor([4]), torch.tensor([4]),
                       req_draft_entropy=entropy).req_steps.item()
    # Observed acceptance 1.0 vs mean bound 0.452: offset 0.5 * 0.548 = 0.274 -> the
    # threshold drops to 0.226 and all four positions pass (+1 probe).
    second = pol.update(torch.tensor([0]), torch.tensor([4]), torch.tensor([4]),
                        req_draft_entropy=entropy).req_steps.item()
    assert (first, second) == (1, 5)
    pol.reset_slots(torch.tensor([0]))
    assert pol.offset[0].item() == 0.0 and pol.steps_for(torch.tensor([0])).item() == 4
