"""The speculation-length policy interface that the SGLang worker, the simulator and the
replay all call (one implementation per policy, no second copy anywhere).

Per-request state lives in device tensors indexed by *slot* (an int in ``[0, max_slots)``,
SGLang's ``req_pool_indices``). A round goes::

    req_steps = policy.steps_for(slots)            # [bs] SL of each request this round
    policy.observe_first_entropy(slots, entropy)   # only when needs_first_entropy
    steps = policy.batch_steps_for(slots)          # the batch's step count (default: max)
    ... draft ``steps`` steps, verify ...
    policy.observe_round(bs, steps, seconds)       # the round's measured time (host)
    decision = policy.update(slots, req_num_drafted, req_num_accepted,
                             req_kl=kl, req_temperature=temps)
    ... when requests finish or abort:
    policy.reset_slots(finished_slots)

Contract of ``update`` (all tensors on the policy's device, ``bs`` = ``len(slots)``):

* ``slots``: ``[bs]`` int64, distinct, each in ``[0, max_slots)``.
* ``req_num_drafted``: ``[bs]`` drafted tokens of each request this round (>= 0).
* ``req_num_accepted``: ``[bs]`` accepted drafted tokens (0 .. drafted; the bonus token
  is not counted).
* ``req_kl``: ``[bs, P]`` KL per drafted position (``kl.kl_per_position``); values at
  positions ``>= req_num_drafted`` are ignored. Required when ``needs_kl``.
* ``req_temperature``: ``[bs]``, 0 for greedy requests (default: all greedy).
* ``req_draft_entropy``: ``[bs, P]`` draft entropies; required when
  ``needs_draft_entropy``.

It returns a ``PolicyDecision``; each request's SL for its next round is stored, so
``steps_for`` of a later batch returns it (a fresh or reset slot returns the policy's
initial SL). No host synchronisation happens in ``steps_for``, ``update`` or
``reset_slots``: the worker syncs once, on ``decision.batch_steps``, to pick the runtime
state, and may capture the update in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...config import DSDEConfig


class PolicyDecision(NamedTuple):
    """The outcome of one verify round for one batch (all on the policy's device)."""

    #: ``[bs]`` int64: each request's SL for its next round (capped where capping applies).
    req_steps: torch.Tensor
    #: 0-dim int64: the batch's step count, ``max(req_steps)`` (0 for an empty batch).
    batch_steps: torch.Tensor
    #: 0-dim int64: the batch cap, or -1 when no request was capped or capping is off.
    cap: torch.Tensor


class SpecPolicy:
    """Base class: config, slot-indexed current SL, and the shared argument handling."""

    #: Registry name (``DSDEConfig.policy``).
    name = ""
    #: Whether ``update`` reads ``req_kl`` (the worker computes KL only when it does).
    needs_kl = False
    #: Whether ``update`` reads ``req_draft_entropy``.
    needs_draft_entropy = False
    #: Whether the policy reads ``observe_first_entropy``.
    needs_first_entropy = False

    def __init__(self, cfg: DSDEConfig, *, max_slots: int, device, initial_steps: int):
        if max_slots < 1:
            raise ValueError(f"max_slots = {max_slots}: expected an integer >= 1")
        if not cfg.min_steps <= initial_steps <= cfg.max_steps:
            raise ValueError(f"initial SL = {initial_steps}: expected an integer in "
                             f"[min_steps={cfg.min_steps}, max_steps={cfg.max_steps}]")
        self.cfg = cfg
        self.max_slots = int(max_slots)
        self.device = torch.device(device)
        self.initial_steps = int(initial_steps)
        #: ``[max_slots]`` int64: each slot's SL for its next round.
        self.req_steps = torch.full((self.max_slots,), self.initial_steps, dtype=torch.int64,
                                    device=self.device)

    def steps_for(self, slots: torch.Tensor) -> torch.Tensor:
        """``[bs]`` int64: the SL of each request of this batch for the coming round."""
        return self.req_steps[slots]

    def observe_first_entropy(self, slots: torch.Tensor,
                              req_first_entropy: torch.Tensor) -> None:
        """``[bs]`` entropy (nats) of each request's first draft distribution for the
        coming round (known before drafting; NaN: unknown). Default: ignored."""

    def batch_steps_for(self, slots: torch.Tensor) -> torch.Tensor:
        """0-dim int64: the step count a batch of ``slots`` drafts in the coming round.

        Default: the largest SL of the batch (0 for an empty batch). The engine reads it
        once per round; the simulator calls it too.
        """
        req_steps = self.steps_for(self._ints(slots))
        if req_steps.numel() == 0:
            return torch.zeros((), dtype=torch.int64, device=self.device)
        return req_steps.max()

    def observe_round(self, batch_size: int, batch_steps: int, seconds: float) -> None:
        """A measured round (host numbers): ``batch_size`` requests drafted
        ``batch_steps`` and the round took ``seconds``. Default: ignored."""

    def describe(self) -> dict:
        """Server-wide learned state for humans (``/server_info``; reads the device, so
        never call it in the round path). Default: nothing."""
        return {}

    def reset_slots(self, slots: torch.Tensor) -> None:
        """Forget the requests in ``slots`` (finished or aborted); batched."""
        self.req_steps[slots] = self.initial_steps

    def update(self, slots: torch.Tensor, req_num_drafted: torch.Tensor,
               req_num_accepted: torch.Tensor, *, req_kl: Optional[torch.Tensor] = None,
               req_temperature: Optional[torch.Tensor] = None,
               req_draft_entropy: Optional[torch.Tensor] = None) -> PolicyDecision:
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------

    def _ints(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(device=self.device, dtype=torch.int64)

    def _floats(self, values: Optional[torch.Tensor], shape: tuple) -> torch.Tensor:
        """float64 copy on the device, or zeros of ``shape`` when ``values`` is None."""
        if values is None:
            return torch.zeros(shape, dtype=torch.float64, device=self.device)
        return values.to(device=self.device, dtype=torch.float64)

    def _decision(self, req_steps: torch.Tensor, cap: Optional[torch.Tensor] = None
                  ) -> PolicyDecision:
        if req_steps.numel():
            batch_steps = req_steps.max()
        else:
            batch_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        if cap is None:
            cap = torch.full((), -1, dtype=torch.int64, device=self.device)
        return PolicyDecision(req_steps, batch_steps, cap)


def drafted_mask(req_num_drafted: torch.Tensor, num_pos: int) -> torch.Tensor:
    """``[bs, num_pos]`` bool: position j of request i was drafted."""
    pos = torch.arange(num_pos, device=req_num_drafted.device).unsqueeze(0)
    return pos < req_num_drafted.unsqueeze(1)
