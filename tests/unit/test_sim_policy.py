"""Policies through the simulator make the same decisions as the core run by hand.

The simulated rounds are written in the replay's trace format and run through
``sglang_dsde.replay`` (the core's policy objects, driven round by round outside the
simulator); each request's SL in its next round must equal the replay's decision.
"""

import json

import numpy as np
import pytest

from sglang_dsde import replay
from sglang_dsde.sim import LinearRoundCost, parse_contender, simulate
from sglang_dsde.sim.contenders import build_controller, contender_config
from sglang_dsde.sim.controllers import PolicyController
from sglang_dsde.trace import read_trace, synthetic_request

COST = LinearRoundCost.from_parts(draft_step=(0.1, 0.0), verify=(1.0, 0.05), name="c",
                                  unit="u")


class LoggingController(PolicyController):
    """A PolicyController that also keeps what each round fed the policy."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rounds = []

    def observe(self, batch, req_drafted, req_accepted):
        super().observe(batch, req_drafted, req_accepted)
        self.rounds.append([
            dict(request=r.trace.id, drafted=int(d), accepted=int(a),
                 kl=[float(x) for x in r.trace.kl[r.pos][:int(d)]],
                 draft_entropy=[float(x) for x in r.trace.draft_entropy[r.pos][:int(d)]],
                 done=min(int(a) + 1, r.remaining) >= r.remaining)
            for r, d, a in zip(batch, req_drafted, req_accepted)])


def varied_requests(num, seed):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(num):
        p = [0.2, 0.5, 0.9][i % 3]
        agree = rng.random(int(rng.integers(20, 60))) < p
        req = synthetic_request(f"r{i}", agree, 8)
        req.kl = (req.kl * rng.uniform(0.3, 1.5, size=req.kl.shape)).astype(np.float32)
        req.draft_entropy = req.kl.copy()
        reqs.append(req)
    return reqs


@pytest.mark.parametrize("spec,concurrency", [("dsde", 1), ("dsde:window=8", 3),
                                              ("dsde-padded", 3), ("dsde+cut", 3),
                                              ("adaedl", 2), ("adaedl-padded", 2),
                                              ("sglang_adaptive", 3)])
def test_simulated_decisions_equal_the_replayed_core(spec, concurrency):
    contender = parse_contender(spec)
    cfg = contender_config(contender, 8)
    controller = LoggingController(cfg, max_slots=concurrency, initial_steps=cfg.initial_steps,
                                   name=spec)
    res = simulate(varied_requests(6, seed=concurrency), controller, COST,
                   concurrency=concurrency, log_steps=True)
    lines = [json.dumps(dict(round=i, temperature=0.0, **entry))
             for i, entries in enumerate(controller.rounds) for entry in entries]
    view = read_trace(lines, need_entropy=True)
    decisions = list(replay.run_rounds(view, cfg))
    assert len(decisions) == len(res.round_req_steps) == len(controller.rounds)
    current = {}          # each running request's SL as decided by the replay
    checked = 0
    for i, drafted in enumerate(res.round_req_steps):
        want = {rid: current.get(rid, cfg.initial_steps) for rid in drafted}
        # The batch runs the largest runtime state not above its longest request's SL.
        batch = controller.driver.snap_host(max(want.values()))
        if contender.policy == "sglang_adaptive":
            # One SL per batch tier (batches of 1..3 all use tier 1): the previous
            # round's decision, for every request of the batch.
            previous = set(decisions[i - 1]["steps"].values()) if i else {cfg.initial_steps}
            assert set(drafted.values()) == previous if i else len(set(drafted.values())) == 1
        elif cfg.per_request_cut or cfg.ragged_verify:
            # each request verified on its own SL, within what the batch drafts
            assert drafted == {rid: min(k, batch) for rid, k in want.items()}
        else:
            assert set(drafted.values()) == {batch}
        current.update(decisions[i]["steps"])
        for entry in controller.rounds[i]:
            if entry["done"]:
                current.pop(entry["request"], None)
        checked += 1
    assert checked > 20


def test_policy_state_is_reset_when_a_slot_is_reused():
    contender = parse_contender("dsde:window=4")
    controller = build_controller(contender, max_steps=8, max_slots=1, cost=COST)
    reqs = [synthetic_request("long", [True] * 40, 8), synthetic_request("next", [False] * 5, 8)]
    res = simulate(reqs, controller, COST, concurrency=1, log_steps=True)
    first_of_next = next(r for r in res.round_req_steps if "next" in r)
    assert first_of_next["next"] == contender_config(contender, 8).initial_steps
