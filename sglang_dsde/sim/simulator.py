"""The closed-loop batch simulator: a controller's SL decisions replayed over traces.

``simulate(requests, controller, cost, concurrency=C)`` semantics:

* Closed loop: at most C requests run; the rest wait in trace order. A request joins
  the moment a slot is free (at the start, C join); joining costs its prefill
  (``cost.prefill(prompt_len)``, requests prefill one after another, not batched with
  each other), which produces output token 0. A request of one token is then done.
* Rounds: the running requests form the batch (``bs`` of them). The controller plans
  ``batch_steps`` and ``req_drafted``; request i accepts ``a_i = min(accept[pos_i],
  req_drafted[i])`` and advances ``min(a_i + 1, remaining_i)`` tokens (accepted drafts +
  the bonus token; a request stops at its recorded length). The round is charged for
  ``sum(req_drafted)`` verified drafts when the controller verifies ragged, else for
  every request's full window (``bs * batch_steps``). ``batch_steps = 0`` is a
  plain decode step (the engine's free off): every request advances one token. The
  controller observes ``(req_drafted, a)`` and the KL rows at the round's positions. The
  round costs ``cost.round(bs, batch_steps, verified, catch_up)``, which the controller
  observes too (the engine times its rounds): a drafting round first pays the catch-up of
  the tokens its requests' drafts have not seen (``controllers.pending_catch_up``: one per
  request after its prefill, one more per off round).
* The clock is the sum of prefill and round costs (one engine, no overlap). A request's
  latency is finish - join; TTFT is its prefill end - join; TPOT is (finish - prefill end)
  / (n - 1).

Outputs (``SimResult``): per request timings and counts, and a round log (start time,
``bs``, ``batch_steps``, tokens, request-rounds; with ``log_steps`` also each request's
drafted count per round, for plots; with ``log_rounds`` the round view of the run, the
lines ``sglang_dsde.replay`` replays open loop). Deterministic: no randomness at all.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .controllers import ActiveRequest, Controller, pending_catch_up
from .cost import RoundCost
from ..trace import RequestTrace, round_line_json


@dataclass
class RequestResult:
    id: str
    num_tokens: int
    join_time: float
    first_token_time: float
    finish_time: float
    num_rounds: int = 0
    num_accepted: int = 0

    @property
    def latency(self) -> float:
        return self.finish_time - self.join_time

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.join_time

    @property
    def tpot(self) -> Optional[float]:
        if self.num_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_tokens - 1)


@dataclass
class SimResult:
    name: str
    concurrency: int
    makespan: float
    requests: List[RequestResult]
    #: ``[num_rounds]`` arrays: start time, batch size, batch steps, tokens produced.
    round_start: np.ndarray
    round_bs: np.ndarray
    round_steps: np.ndarray
    round_tokens: np.ndarray
    #: Per round, ``{request id: drafted}`` (only with ``log_steps``).
    round_req_steps: List[Dict[str, int]] = field(default_factory=list)
    #: The round view (``trace.round_line_json`` lines; only with ``log_rounds``).
    round_view: List[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.requests)


def simulate(requests: Sequence[RequestTrace], controller: Controller, cost: RoundCost, *,
             concurrency: int, log_steps: bool = False, log_rounds: bool = False,
             name: str = "") -> SimResult:
    """Run ``controller`` over ``requests`` (module docstring). Slots are ``0 .. C-1``."""
    if concurrency < 1:
        raise ValueError(f"concurrency = {concurrency}: expected >= 1")
    waiting = deque(requests)
    free_slots = list(range(concurrency - 1, -1, -1))
    active: List[ActiveRequest] = []
    results: Dict[int, RequestResult] = {}
    clock = 0.0
    log_start, log_bs, log_steps_arr, log_tokens = [], [], [], []
    req_steps_log: List[Dict[str, int]] = []
    round_view: List[str] = []

    def finish(req: ActiveRequest) -> None:
        results[req.slot].finish_time = clock
        finished.append(results.pop(req.slot))
        free_slots.append(req.slot)

    finished: List[RequestResult] = []
    while waiting or active:
        while waiting and free_slots:
            trace = waiting.popleft()
            slot = free_slots.pop()
            join = clock
            clock += cost.prefill(trace.prompt_len)
            results[slot] = RequestResult(trace.id, trace.num_tokens, join, clock, clock)
            controller.admit(slot)
            req = ActiveRequest(slot, trace, 1)
            if req.remaining <= 0:
                finish(req)
                controller.release([slot])
            else:
                active.append(req)
        if not active:
            continue
        req_drafted, batch_steps = controller.plan(active)
        req_drafted = np.asarray(req_drafted, dtype=np.int64)
        accept_here = np.array([r.trace.accept[r.pos] for r in active], dtype=np.int64)
        req_accepted = np.minimum(accept_here, req_drafted)
        controller.observe(active, req_drafted, req_accepted)
        log_start.append(clock)
        verified = (int(req_drafted.sum()) if controller.ragged
                    else len(active) * batch_steps)
        catch_up = pending_catch_up(active) if batch_steps > 0 else 0
        round_cost = cost.round(len(active), batch_steps, verified, catch_up)
        controller.observe_cost(len(active), batch_steps, round_cost, verified, catch_up)
        clock += round_cost
        log_bs.append(len(active))
        log_steps_arr.append(batch_steps)
        if log_steps:
            req_steps_log.append({r.trace.id: int(d) for r, d in zip(active, req_drafted)})
        if log_rounds:
            round_view += _round_view(len(log_bs) - 1, active, req_drafted, req_accepted,
                                      round_cost)
        tokens = 0
        still, done_slots = [], []
        for req, acc in zip(active, req_accepted):
            req.gap = 0 if batch_steps > 0 else req.gap + 1
            step = min(int(acc) + 1, req.remaining)
            req.pos += step
            tokens += step
            res = results[req.slot]
            res.num_rounds += 1
            res.num_accepted += int(acc)
            if req.remaining <= 0:
                finish(req)
                done_slots.append(req.slot)
            else:
                still.append(req)
        log_tokens.append(tokens)
        if done_slots:
            controller.release(done_slots)
        active = still
    order = {t.id: i for i, t in enumerate(requests)}
    finished.sort(key=lambda r: order[r.id])
    return SimResult(name or controller.name, concurrency, clock, finished,
                     np.array(log_start), np.array(log_bs, dtype=np.int64),
                     np.array(log_steps_arr, dtype=np.int64),
                     np.array(log_tokens, dtype=np.int64), req_steps_log, round_view)


def _round_view(round_id: int, batch: Sequence[ActiveRequest], req_drafted, req_accepted,
                seconds: float) -> List[str]:
    """One round of the run as round-view lines (before positions advance)."""
    lines = []
    for r, d, a in zip(batch, req_drafted, req_accepted):
        entropy = r.trace.draft_entropy
        lines.append(round_line_json(
            round=round_id, request=r.trace.id, drafted=int(d), accepted=int(a),
            kl=r.trace.kl[r.pos][:int(d)],
            draft_entropy=None if entropy is None else entropy[r.pos][:int(d)],
            first_entropy=None if entropy is None else float(entropy[r.pos][0]),
            done=min(int(a) + 1, r.remaining) >= r.remaining, seconds=seconds))
    return lines
