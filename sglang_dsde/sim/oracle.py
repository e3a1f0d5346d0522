"""The hindsight oracle: the best SL per round when acceptance is known in advance.

Per request, ``request_dp`` solves exactly, by dynamic programming over output
positions, the cheapest sequence of rounds that produces the request's tokens::

    V[n] = 0
    V[p] = min over k in 0..K of  c[k] + V[p + min(min(accept[p], k) + 1, n - p)]

(start at position 1: the prefill produced token 0). ``c[k]`` is the cost charged to the
request for a round in which it drafts k tokens.

``oracle_bound(requests, cost, concurrency=C)`` is an UPPER BOUND on the throughput of
every schedule the simulator can run (every policy, static SL, per-request cut or not,
the hindsight-greedy schedule), built from a per-request lower bound on time:

* a round of ``bs <= C`` requests with batch step count ``K`` costs ``cost(bs, K) >=
  sum_i cost(bs, e_i) / bs`` for any ``e_i <= K`` (cost non-decreasing in k, checked),
  where ``e_i`` is what request i was verified on;
* ``cost(bs, e) / bs >= share(e) := min over b in 1..C of cost(b, e) / b``;
* so the total round time is at least ``sum_i V_i`` with ``c = share``, and the makespan
  at least that plus the (schedule-independent) prefills. Throughput bound = tokens /
  that time.

At C = 1, ``share = cost(1, .)``, the bound is achieved by the per-request DP schedule:
it IS the oracle, and latencies follow (``OracleResult.latencies``). At C > 1 the bound
ignores that a batch drafts its maximum SL (the straggler effect) and that the batch is
not always full; it is optimistic, so "fraction of oracle" is conservative there.

Ragged schedules (each request verifies its own ``e_i``; the round costs
``cost(bs, K, sum e_i)``): a linear model splits that sum exactly into the same shares,
so the bound stands. A non-linear one (the roofline) need not, so with ``ragged`` the
share is ``min over b of cost(b, k, verified=k) / b`` (the request's own drafts verified,
nobody else's): ``cost(bs, K, T) >= cost(bs, e_i, e_i)`` for every i, since the cost grows
with the step count and with the verified tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..core.round_cost import LinearRoundCost
from .cost import RoundCost
from ..trace import RequestTrace


def request_dp(accept: np.ndarray, step_costs: Sequence[float], start: int = 1
               ) -> Tuple[float, List[int]]:
    """(minimal total cost, SL of each round) to produce tokens ``start .. n - 1``."""
    accept = np.asarray(accept, dtype=np.int64)
    n = accept.shape[0]
    costs = np.asarray(step_costs, dtype=np.float64)
    steps = np.arange(costs.shape[0])
    value = np.zeros(n + 1)
    choice = np.zeros(n + 1, dtype=np.int64)
    for p in range(n - 1, start - 1, -1):
        nxt = np.minimum(p + np.minimum(accept[p], steps) + 1, n)
        totals = costs + value[nxt]
        k = int(np.argmin(totals))   # first minimum: the shortest SL among ties
        value[p], choice[p] = totals[k], k
    plan, p = [], start
    while p < n:
        k = int(choice[p])
        plan.append(k)
        p = min(p + min(int(accept[p]), k) + 1, n)
    return (float(value[start]) if start < n else 0.0), plan


def share_costs(cost: RoundCost, concurrency: int, max_steps: int,
                ragged: bool = False) -> np.ndarray:
    """``[max_steps + 1]``: ``min over b in 1..C of cost(b, k) / b`` (module docstring for
    ``ragged``); checks monotonicity."""
    own = ragged and not isinstance(cost, LinearRoundCost)
    table = np.array([[cost.round(b, k, k) if own else cost.round(b, k)
                       for k in range(max_steps + 1)]
                      for b in range(1, concurrency + 1)])
    if np.any(np.diff(table, axis=1) < -1e-12 * np.abs(table[:, 1:])):
        raise ValueError(f"cost model {getattr(cost, 'name', cost)} is not non-decreasing in "
                         f"the step count: the oracle bound does not hold")
    return (table / np.arange(1, concurrency + 1)[:, None]).min(axis=0)


@dataclass
class OracleResult:
    concurrency: int
    #: Lower bound on the makespan (exact at C = 1).
    makespan: float
    num_tokens: int
    #: Per request: its DP round time and its plan (SL per round).
    req_round_time: List[float]
    req_plans: List[List[int]]
    #: Per request latency (prefill + DP time); only at C = 1, where it is achievable.
    latencies: Optional[List[float]]

    @property
    def throughput(self) -> float:
        return self.num_tokens / self.makespan if self.makespan > 0 else float("inf")

    @property
    def num_request_rounds(self) -> int:
        return sum(len(p) for p in self.req_plans)


def oracle_bound(requests: Sequence[RequestTrace], cost: RoundCost, *, concurrency: int,
                 max_steps: int, ragged: bool = False) -> OracleResult:
    """The oracle (module docstring) over ``requests`` with SLs in ``0..max_steps``; with
    ``ragged`` it also bounds schedules that verify each request on its own SL."""
    shares = share_costs(cost, concurrency, max_steps, ragged)
    times, plans, prefills = [], [], []
    for req in requests:
        t, plan = request_dp(req.accept, shares)
        times.append(t)
        plans.append(plan)
        prefills.append(cost.prefill(req.prompt_len))
    makespan = float(sum(times) + sum(prefills))
    latencies = ([p + t for p, t in zip(prefills, times)] if concurrency == 1 else None)
    return OracleResult(concurrency, makespan, sum(r.num_tokens for r in requests), times,
                        plans, latencies)
