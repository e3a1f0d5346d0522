"""The hindsight oracle: exact per-request DP, and an upper bound on every schedule."""

import functools

import numpy as np
import pytest

from sglang_dsde.sim import (LinearRoundCost, gpu_preset, oracle_bound, parse_contender,
                             request_dp, run_cell)
from sglang_dsde.sim.contenders import static_contenders
from sglang_dsde.sim.oracle import share_costs
from sglang_dsde.trace import runs_to_accept, synthetic_trace

CPU_LIKE = LinearRoundCost.from_parts(draft_step=(0.19, 0.02), verify=(0.79, 0.21),
                                      spec=(0.1, 0.01), prefill=(1.0, 0.0), name="cpu-like",
                                      unit="u")
GPU_LIKE = LinearRoundCost.from_parts(draft_step=(0.06, 0.002), verify=(0.99, 0.01),
                                      name="gpu-like", unit="u")


def brute_force_min_cost(accept, costs, start=1):
    n = len(accept)

    @functools.lru_cache(maxsize=None)
    def best(p):
        if p >= n:
            return 0.0
        return min(c + best(min(p + min(int(accept[p]), k) + 1, n))
                   for k, c in enumerate(costs))

    return best(start)


@pytest.mark.parametrize("seed", range(5))
def test_dp_equals_exhaustive_search_and_its_plan_replays(seed):
    rng = np.random.default_rng(seed)
    accept = runs_to_accept(rng.random(14) < 0.6, 4)
    costs = [1.0, 1.2, 1.35, 1.5, 1.9]
    value, plan = request_dp(accept, costs)
    assert value == pytest.approx(brute_force_min_cost(accept, costs))
    pos, total = 1, 0.0
    for k in plan:
        total += costs[k]
        pos = min(pos + min(int(accept[pos]), k) + 1, len(accept))
    assert pos == len(accept) and total == pytest.approx(value)


@pytest.mark.parametrize("cost,concurrency", [(CPU_LIKE, 1), (GPU_LIKE, 4),
                                              (gpu_preset("h100-llama3-8b", 512), 1),
                                              (gpu_preset("h100-llama3-8b", 512), 4)],
                         ids=["cpu-like-1", "gpu-like-4", "h100-1", "h100-4"])
def test_oracle_bounds_every_static_sl_every_policy_and_hindsight(cost, concurrency):
    trace = synthetic_trace(4, 80, 6, 0.65, seed=concurrency)
    contenders = static_contenders(6) + [parse_contender(s) for s in (
        "dsde", "dsde-padded", "dsde+cut", "sglang_adaptive", "adaedl", "goodput",
        "goodput-padded", "hindsight-greedy", "hindsight-ragged")]
    rows, _ = run_cell(trace.requests, contenders, cost, concurrency=concurrency,
                       max_steps=6, cell={"trace": "syn", "cost": cost.name})
    oracle = next(r for r in rows if r["contender"] == "oracle")
    for row in rows:
        assert row["throughput"] <= oracle["throughput"] * (1 + 1e-9), row["contender"]
        assert row["oracle_frac"] <= 1 + 1e-9


def test_at_concurrency_one_the_oracle_is_achieved_by_its_plans():
    trace = synthetic_trace(5, 80, 6, 0.7, seed=2)
    bound = oracle_bound(trace.requests, CPU_LIKE, concurrency=1, max_steps=6)
    shares = share_costs(CPU_LIKE, 1, 6)
    replayed = 0.0
    for req, plan in zip(trace.requests, bound.req_plans):
        replayed += CPU_LIKE.prefill(req.prompt_len) + sum(shares[k] for k in plan)
    assert bound.makespan == pytest.approx(replayed)
    assert bound.latencies is not None and len(bound.latencies) == 5
    assert oracle_bound(trace.requests, CPU_LIKE, concurrency=4, max_steps=6).latencies is None


def test_share_uses_the_cheapest_batch_size_and_refuses_a_decreasing_cost():
    shares = share_costs(CPU_LIKE, 4, 3)
    for k in range(4):
        assert shares[k] == pytest.approx(min(CPU_LIKE.round(b, k) / b for b in range(1, 5)))

    class Decreasing:
        name = "decreasing"

        def round(self, bs, k):
            return 1.0 / (k + 1)

    with pytest.raises(ValueError, match="non-decreasing"):
        share_costs(Decreasing(), 1, 3)
