"""TP ranks take the same decision every round: two processes (torch.distributed, gloo)
run the decision path (``DSDERuntime`` + the default goodput policy through the driver)
over the same stream of rounds (identical logits, accept lengths and batches), each
timing its rounds on its own jittered clock, as two TP ranks of one server do.

With the runtime sharing rank 0's round-cost sample (what ``DSDEWorkerV2`` passes under
TP > 1) they agree on all 1,000 rounds. The control, the same run without sharing, shows
the test is meaningful: each rank's cost model learns its own clock and the decisions
part (deterministically, within the first hundred rounds of this stream), which on a
real server means different runtime states and mismatched collectives.
"""

from __future__ import annotations

from tools.round_stream import decisions_on_ranks


def test_two_ranks_agree_on_every_round_when_rank0s_cost_is_shared():
    rank0, rank1 = decisions_on_ranks(rounds=1000, share=True, lag_rounds=1)
    assert len(rank0) == 1000
    assert sum(a == b for a, b in zip(rank0, rank1)) == 1000
    assert len(set(rank0)) > 2  # the policy did move: agreement is not trivial


def test_without_sharing_the_ranks_jittered_clocks_part_their_decisions():
    rank0, rank1 = decisions_on_ranks(rounds=300, share=False, lag_rounds=1)
    assert sum(a != b for a, b in zip(rank0, rank1)) > 0
