"""DSDERuntime (pure torch): buffers by slot and row, the signal, robustness, decisions."""

from __future__ import annotations

import math

import torch

from sglang_dsde.config import DSDEConfig
from sglang_dsde.core import kl_per_position, make_policy
from sglang_dsde.runtime import DSDERuntime

VOCAB = 50


def make_runtime(lag_rounds=0, **cfg):
    config = DSDEConfig(**{"policy": "dsde", "window": 4, "min_steps": 1, "max_steps": 4,
                           **cfg})
    return DSDERuntime(config, max_slots=8, max_rows=8, vocab_size=VOCAB, initial_steps=2,
                       lag_rounds=lag_rounds)


def play_round(runtime, slots, steps, gen, target=None, accept_lens=None):
    """Draft ``steps`` positions for ``slots`` and verify; return (draft, target, req_steps)."""
    bs = len(slots)
    slots = torch.tensor(slots)
    runtime.begin_round(slots, steps)
    draft = torch.randn(bs, steps + 1, VOCAB, generator=gen)
    draft[:, 0] = runtime.slot_first_draft[slots]
    for j in range(1, steps):
        runtime.record_draft_step(draft[:, j].clone(), steps=steps)
    if target is None:
        target = torch.randn(bs * (steps + 1), VOCAB, generator=gen)
    if accept_lens is None:
        accept_lens = torch.randint(1, steps + 2, (bs,), generator=gen)
    req_steps = runtime.on_verify(slots, steps, target, accept_lens)
    return draft, target, req_steps, accept_lens


def test_signal_pairs_target_rows_with_the_drafts_that_proposed_them():
    gen = torch.Generator().manual_seed(0)
    runtime = make_runtime()
    slots = [3, 5]
    runtime.on_slots_allocated(torch.tensor(slots))
    runtime.record_first_draft(torch.tensor(slots), torch.randn(2, VOCAB, generator=gen))
    draft, target, req_steps, accepted = play_round(runtime, slots, 3, gen)
    # The same round through the core directly: KL over positions 0..2, bonus masked.
    kl = kl_per_position(target.view(2, 4, VOCAB), draft, torch.tensor([3, 3]))
    reference = make_policy(runtime.cfg, max_slots=8, default_initial_steps=2)
    expected = reference.update(torch.tensor(slots), torch.tensor([3, 3]), accepted - 1,
                                req_kl=kl[:, :3])
    assert torch.equal(req_steps, expected.req_steps)
    assert torch.equal(runtime.policy.history.values, reference.history.values)


def test_first_draft_follows_the_slot_not_the_row():
    gen = torch.Generator().manual_seed(1)
    runtime = make_runtime()
    first = torch.randn(2, VOCAB, generator=gen)
    runtime.record_first_draft(torch.tensor([6, 1]), first)
    runtime.begin_round(torch.tensor([1, 6]), 2)  # the next batch in another order
    rows = runtime.round_draft_logits(2, 2)[:, 0]
    assert torch.equal(rows[0], first[1]) and torch.equal(rows[1], first[0])


def test_non_finite_logits_skip_the_signal_and_fall_back_to_the_static_length():
    gen = torch.Generator().manual_seed(2)
    runtime = make_runtime()
    slots = torch.tensor([0, 1])
    runtime.on_slots_allocated(slots)
    for _ in range(6):  # past warm-up: the healthy request leaves the static length
        target = torch.randn(2 * 4, VOCAB, generator=gen)
        target[4:, 7] = float("nan")  # request 1: NaN in every target row
        _, _, req_steps, _ = play_round(runtime, [0, 1], 3, gen, target=target,
                                        accept_lens=torch.tensor([4, 4]))
        assert int(req_steps[1]) == runtime.initial_steps
        assert int(runtime.policy.history.n_seen[1]) == 0  # nothing entered its history
    assert int(runtime.policy.history.n_seen[0]) == 18
    assert runtime.next_batch_steps(slots) >= runtime.initial_steps
    assert runtime.num_skipped_signals == 6


def test_slot_lifetime_resets_state_and_tracks_occupancy():
    gen = torch.Generator().manual_seed(3)
    runtime = make_runtime()
    slots = torch.tensor([2, 4])
    runtime.on_slots_allocated(slots)
    for _ in range(4):
        play_round(runtime, [2, 4], 2, gen, accept_lens=torch.tensor([3, 3]))
    assert runtime.stats()["live_slots"] == 2
    assert int(runtime.policy.steps_for(slots).max()) > runtime.initial_steps
    runtime.on_slots_freed([2])                         # host ints, as SGLang's pool hands them
    assert runtime.stats()["live_slots"] == 1
    # Recorded on the host; applied (staged) at the runtime's next round-path call.
    assert int(runtime.policy.history.n_seen[2]) > 0
    runtime.next_batch_steps(torch.tensor([4]))
    assert int(runtime.policy.steps_for(torch.tensor([2]))) == runtime.initial_steps
    assert int(runtime.policy.history.n_seen[2]) == 0
    runtime.on_slots_freed(torch.tensor([4]))
    assert runtime.stats()["live_slots"] == 0


def test_decisions_reach_the_host_with_the_configured_lag():
    """Without overlap a round uses the decision of the round before; with overlap
    (lag 1) the CPU runs one round ahead, so it uses the decision of two rounds before."""
    gen = torch.Generator().manual_seed(4)
    for lag in (0, 1):
        runtime = make_runtime(lag_rounds=lag)
        slots = torch.tensor([0])
        runtime.on_slots_allocated(slots)
        used, decided = [], []
        for _ in range(8):
            steps = runtime.next_batch_steps(slots)
            used.append(steps)
            _, _, req_steps, _ = play_round(runtime, [0], steps, gen,
                                            accept_lens=torch.tensor([steps + 1]))
            decided.append(int(req_steps.max()))
        assert used[: lag + 1] == [runtime.initial_steps] * (lag + 1)
        assert used[lag + 1:] == decided[: len(used) - lag - 1]
        histogram = {str(k): used.count(k) for k in sorted(set(used))}
        assert runtime.stats()["batch_steps_histogram"] == histogram


def test_a_lagged_round_verifies_the_lengths_of_the_decision_it_runs():
    """Under overlap (lag 1) a round runs the step count decided two rounds before; its
    per-request lengths (a ragged verify's, the cut's) are that same decision's, not the
    policy's newest (which may draft nothing where the round drafts: a probe out of the
    off state would then verify no drafted token)."""
    gen = torch.Generator().manual_seed(5)
    runtime = make_runtime(lag_rounds=1)
    slots = torch.tensor([0, 1])
    runtime.on_slots_allocated(slots)
    decided, differs = [], 0
    for _ in range(12):
        steps = runtime.next_batch_steps(slots)
        lengths = runtime.round_lengths(slots)
        if len(decided) >= 2:
            assert torch.equal(lengths, decided[-2])
            differs += not torch.equal(lengths, runtime.policy.req_steps[slots])
        play_round(runtime, [0, 1], steps, gen)
        decided.append(runtime.policy.req_steps[slots].clone())
    assert differs > 0
    # A request that joins while decisions are in flight gets its fresh length in them.
    runtime.policy.req_steps[2] = 0  # what the slot's previous request left
    for _ in range(2):
        play_round(runtime, [0, 1], runtime.next_batch_steps(slots), gen)
    runtime.on_slots_allocated(torch.tensor([2]))
    runtime.next_batch_steps(torch.tensor([0, 1, 2]))
    assert int(runtime.round_lengths(torch.tensor([2]))) == runtime.initial_steps


def test_per_request_cut_stops_each_chain_after_its_own_length():
    runtime = make_runtime()
    slots = torch.tensor([0, 1])
    runtime.policy.req_steps[slots] = torch.tensor([1, 4])
    chain = torch.tensor([[1, 2, 3, 4, -1], [1, 2, 3, 4, -1]])  # topk 1: node j -> j + 1
    runtime.cut_chains(slots, chain)
    assert chain.tolist() == [[1, -1, -1, -1, -1], [1, 2, 3, 4, -1]]


def test_goodput_runtime_reads_first_draft_entropy_and_learns_round_times():
    runtime = make_runtime(policy="goodput", min_steps=0)
    gen = torch.Generator().manual_seed(3)
    slots = torch.tensor([1, 4])
    play_round(runtime, [1, 4], 2, gen)                 # fills each slot's first draft
    runtime.record_first_draft(slots, torch.stack([torch.full((VOCAB,), 0.0),
                                                   torch.nn.functional.one_hot(
                                                       torch.tensor(3), VOCAB) * 50.0]))
    runtime.next_batch_steps(slots)
    entropy = runtime.policy.first_entropy[slots]
    assert abs(float(entropy[0]) - math.log(VOCAB)) < 1e-4 and float(entropy[1]) < 1e-3
    pol = runtime.policy
    # The first round of each step count is a warm-up (one-off work): not timed.
    for t, (bs, steps) in enumerate([(2, 2), (2, 3), (2, 2), (2, 3), (2, 2)]):
        runtime.on_decode_round_start(bs, steps, 10.0 + 0.5 * t)
    assert float(pol.round_cost.num_samples) == 2       # rounds 3 and 4 timed
    runtime.on_other_work()                             # a prefill ran: no sample
    runtime.on_decode_round_start(2, 2, 100.0)
    assert float(pol.round_cost.num_samples) == 2


def test_a_round_of_zero_steps_keeps_its_decision_and_skips_nothing():
    """The no-drafting state verifies only the bonus token: no signal, not a fault."""
    runtime = make_runtime(policy="goodput", min_steps=0)
    slots = torch.tensor([0, 3])
    runtime.on_slots_allocated(slots)
    gen = torch.Generator().manual_seed(4)
    _, _, req_steps, _ = play_round(runtime, [0, 3], 0, gen, accept_lens=torch.tensor([1, 1]))
    decided = runtime.policy.steps_for(slots)
    assert req_steps.tolist() == decided.tolist()
    assert runtime.num_skipped_signals == 0
    assert torch.isnan(runtime.last_req_mean_kl).all()  # nothing drafted, no KL


def test_a_decision_below_the_runnable_floor_runs_and_is_counted_as_the_floor():
    config = DSDEConfig(policy="static", min_steps=0, initial_steps=0, max_steps=4)
    runtime = DSDERuntime(config, max_slots=4, max_rows=4, vocab_size=VOCAB, initial_steps=0,
                          runnable_steps=(1, 2, 3, 4))
    assert runtime.next_batch_steps(torch.tensor([0, 1])) == 1
    assert runtime.stats()["batch_steps_histogram"] == {"1": 1}


def test_reported_next_lengths_are_what_the_engine_will_run():
    config = DSDEConfig(policy="static", min_steps=0, initial_steps=0, max_steps=4)
    runtime = DSDERuntime(config, max_slots=4, max_rows=4, vocab_size=VOCAB, initial_steps=0,
                          runnable_steps=(1, 2, 3, 4))
    _, _, req_steps, _ = play_round(runtime, [0, 2], 1, torch.Generator().manual_seed(0))
    assert req_steps.tolist() == [1, 1]
    assert runtime.policy.steps_for(torch.tensor([0, 2])).tolist() == [0, 0]  # policy's own
