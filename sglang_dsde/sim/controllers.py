"""Who picks the speculation length in a simulated round: a core policy, or hindsight.

Contract (``Controller``), called by ``simulator.simulate`` once per round:

* ``admit(slot)``: a new request took ``slot`` (a fresh policy state);
* ``plan(batch) -> (req_drafted [bs] int, batch_steps int)``: ``batch`` lists the running
  requests (``ActiveRequest``: slot, trace, position); the batch drafts ``batch_steps``
  steps (0: a plain decode step) and request i is verified on ``req_drafted[i]`` draft
  tokens (``batch_steps`` for all, or its own SL with a ragged verify or the per-request
  cut); ``ragged`` says whether the target verifies only those (a ragged verify: the
  round is charged for ``sum(req_drafted)`` verified drafts) or every request's full
  window (padded, the cut included: ``bs * batch_steps``);
* ``observe(batch, req_drafted, req_accepted)``: after verification, before positions
  advance (so the KL rows are those of the round's positions);
* ``observe_cost(bs, batch_steps, cost, verified, catch_up)``: the round's cost (what
  the engine would time), the drafted tokens verified and the catch-up tokens it included
  (``pending_catch_up``);
* ``release(slots)``: the requests in ``slots`` finished.

``PolicyController`` steps any policy of ``sglang_dsde.core`` through the core's
``PolicyDriver``, the engine's own call sequence (``plan`` with the recorded first-draft
entropies, ``observe`` with the recorded KL rows and draft entropies at temperature 0,
``observe_cost`` with the round's modelled cost), and logs each round's decision in the
replay's output format. ``HindsightGreedyController`` knows the trace: each round it
drafts the batch step count that maximises this round's tokens per unit of cost
(achievable, myopic; not an upper bound: see ``oracle``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import DSDEConfig
from ..core import PolicyDriver
from ..core.round_cost import catch_up_tokens, round_sample
from .cost import RoundCost
from ..trace import RequestTrace


@dataclass
class ActiveRequest:
    """A running request: its slot, its trace, ``pos`` output tokens already produced, and
    ``gap``: tokens its draft has not seen (the engine's aligned draft: 1 after the
    prefill, one more per off round, 0 after a drafting round's catch-up)."""

    slot: int
    trace: RequestTrace
    pos: int
    gap: int = 1

    @property
    def remaining(self) -> int:
        return self.trace.num_tokens - self.pos


def pending_catch_up(batch: Sequence[ActiveRequest]) -> int:
    """Catch-up tokens the engine extends before a drafting round of ``batch``
    (``core.round_cost.catch_up_tokens`` of the requests' gaps)."""
    return catch_up_tokens(r.gap for r in batch)


class Controller:
    name = "controller"
    ragged = False

    def admit(self, slot: int) -> None:
        pass

    def plan(self, batch: Sequence[ActiveRequest]) -> Tuple[np.ndarray, int]:
        raise NotImplementedError

    def observe(self, batch: Sequence[ActiveRequest], req_drafted: np.ndarray,
                req_accepted: np.ndarray) -> None:
        pass

    def observe_cost(self, batch_size: int, batch_steps: int, cost: float,
                     verified: Optional[int] = None, catch_up: int = 0) -> None:
        """The round just simulated cost ``cost`` (the engine's measured round time),
        ``catch_up`` catch-up tokens included."""

    def release(self, slots: Sequence[int]) -> None:
        pass


class PolicyController(Controller):
    """A core policy (``cfg.policy``) on ``max_slots`` CPU slots, stepped by the core's
    ``PolicyDriver`` (the engine's call sequence); the per-request cut follows
    ``cfg.per_request_cut``. ``cfg.max_steps`` must not exceed the trace's."""

    def __init__(self, cfg: DSDEConfig, *, max_slots: int, initial_steps: Optional[int] = None,
                 name: str = "", **policy_kwargs):
        self.cfg = cfg
        self.name = name or cfg.policy
        self.driver = PolicyDriver.build(cfg, max_slots=max_slots, device="cpu",
                                         static_steps=initial_steps, **policy_kwargs)
        self.policy = self.driver.policy
        self.ragged = bool(cfg.ragged_verify)
        self.per_request_cut = bool(cfg.per_request_cut)
        #: Per round, the decision in the replay's output format
        #: (``{"round", "cap", "steps": {request id: next SL}}``).
        self.decisions: List[dict] = []

    def _slots(self, batch) -> torch.Tensor:
        return torch.tensor([r.slot for r in batch], dtype=torch.int64)

    def admit(self, slot: int) -> None:
        self.driver.admit(torch.tensor([slot], dtype=torch.int64))

    def plan(self, batch):
        slots = self._slots(batch)
        first_entropy = None
        if all(r.trace.draft_entropy is not None for r in batch):
            first_entropy = torch.tensor([float(r.trace.draft_entropy[r.pos][0])
                                          for r in batch], dtype=torch.float64)
        self.driver.observe_pending_catch_up(pending_catch_up(batch))
        batch_steps = int(self.driver.plan(slots, first_entropy))
        if self.ragged or self.per_request_cut:  # own SLs, within what the batch drafts
            req_steps = self.driver.req_steps(slots).clamp_max(batch_steps)
            return req_steps.numpy().astype(np.int64), batch_steps
        return np.full(len(batch), batch_steps, dtype=np.int64), batch_steps

    def observe(self, batch, req_drafted, req_accepted):
        if int(np.max(req_drafted)) == 0:  # an off round: the engine's call
            decision = self.driver.observe_off(self._slots(batch))
        else:
            decision = self._observe_drafted(batch, req_drafted, req_accepted)
        cap = int(decision.cap)
        self.decisions.append({"round": len(self.decisions), "cap": cap if cap >= 0 else None,
                               "steps": {r.trace.id: int(s) for r, s in
                                         zip(batch, decision.req_steps.tolist())}})

    def _observe_drafted(self, batch, req_drafted, req_accepted):
        width = max(r.trace.max_steps for r in batch)
        kl = np.zeros((len(batch), width), dtype=np.float32)
        entropy = np.zeros_like(kl)
        for i, r in enumerate(batch):
            kl[i, :r.trace.max_steps] = r.trace.kl[r.pos]
            if r.trace.draft_entropy is not None:
                entropy[i, :r.trace.max_steps] = r.trace.draft_entropy[r.pos]
        if self.policy.needs_draft_entropy and any(r.trace.draft_entropy is None for r in batch):
            raise ValueError(f"policy {self.cfg.policy} needs draft entropies; the trace has none")
        return self.driver.observe(
            self._slots(batch), torch.as_tensor(req_drafted), torch.as_tensor(req_accepted),
            kl=torch.from_numpy(kl), temperature=torch.zeros(len(batch)),
            draft_entropy=torch.from_numpy(entropy))

    def observe_cost(self, batch_size, batch_steps, cost, verified=None, catch_up=0):
        self.driver.observe_cost(round_sample(batch_size, batch_steps, cost, verified,
                                              catch_up))

    def release(self, slots):
        self.driver.release(torch.tensor(list(slots), dtype=torch.int64))


def round_gain(batch: Sequence[ActiveRequest], batch_steps: int) -> int:
    """Tokens the batch produces in a round drafting ``batch_steps`` for every request."""
    return sum(min(min(int(r.trace.accept[r.pos]), batch_steps) + 1, r.remaining)
               for r in batch)


class HindsightGreedyController(Controller):
    """Each round: the batch step count in ``0..max_steps`` with the most tokens per unit
    of round cost, knowing every request's acceptance at its position (ties: fewer).
    ``ragged``: every request verifies exactly what it will accept (``min(accept, K)``),
    the per-request hindsight schedule of a ragged verify."""

    name = "hindsight-greedy"

    def __init__(self, cost: RoundCost, max_steps: int, *, ragged: bool = False):
        self.cost = cost
        self.max_steps = int(max_steps)
        self.ragged = bool(ragged)
        if ragged:
            self.name = "hindsight-ragged"

    def plan(self, batch):
        bs, catch_up = len(batch), pending_catch_up(batch)
        accept = np.array([min(int(r.trace.accept[r.pos]), r.remaining - 1) for r in batch])
        best_k, best_rate = 0, -1.0
        for k in range(self.max_steps + 1):
            verified = int(np.minimum(accept, k).sum()) if self.ragged else bs * k
            rate = round_gain(batch, k) / self.cost.round(bs, k, verified, catch_up)
            if rate > best_rate * (1 + 1e-12):
                best_k, best_rate = k, rate
        if self.ragged:
            return np.minimum(accept, best_k).astype(np.int64), best_k
        return np.full(bs, best_k, dtype=np.int64), best_k
