"""The one driver of the policy protocol: the engine runtime, the simulator and the replay
all step a policy through ``PolicyDriver``, so a round means the same thing everywhere.

One round, in this order (any caller)::

    steps = driver.plan(slots, first_entropy)   # 0-dim: the batch's step count
    req_steps = driver.req_steps(slots)         # [bs]: each request's own SL (for a cut)
    ... draft, verify ...
    decision = driver.observe(slots, drafted, accepted, kl=..., temperature=..., ...)
    driver.observe_cost(bs, steps, seconds, catch_up)  # the round's measured/modelled cost
    ... requests join / leave: driver.admit(slots) / driver.release(slots)

``plan`` clamps the policy's batch decision into ``[min_runnable_steps, max_steps]``
(the engine's smallest pre-built state may be above the policy's floor). Everything is a
device tensor; nothing here reads a value back to the host (the caller decides when).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import DSDEConfig, initial_steps_for
from .policies import PolicyDecision, SpecPolicy, make_policy


class PolicyDriver:
    """Steps one ``SpecPolicy`` (module docstring)."""

    def __init__(self, policy: SpecPolicy, *, min_runnable_steps: int = 0):
        self.policy = policy
        self.min_runnable_steps = int(min_runnable_steps)

    @classmethod
    def build(cls, cfg: DSDEConfig, *, max_slots: int, device="cpu",
              static_steps: Optional[int] = None, min_runnable_steps: int = 0,
              **policy_kwargs) -> "PolicyDriver":
        """A driver of a fresh ``cfg.policy`` whose new requests start at
        ``config.initial_steps_for(cfg, static_steps)``."""
        policy = make_policy(cfg, max_slots=max_slots, device=device,
                             default_initial_steps=initial_steps_for(cfg, static_steps),
                             **policy_kwargs)
        return cls(policy, min_runnable_steps=min_runnable_steps)

    @property
    def cfg(self) -> DSDEConfig:
        return self.policy.cfg

    @property
    def initial_steps(self) -> int:
        return self.policy.initial_steps

    # -- request lifetime -------------------------------------------------------------

    def admit(self, slots: torch.Tensor) -> None:
        """New requests took ``slots``: fresh policy state."""
        self.policy.reset_slots(slots)

    def release(self, slots: torch.Tensor) -> None:
        """Requests in ``slots`` finished or were aborted."""
        self.policy.reset_slots(slots)

    # -- one round ----------------------------------------------------------------------

    def plan(self, slots: torch.Tensor,
             first_entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """0-dim int64: the step count the batch drafts in the coming round.

        ``first_entropy`` (``[bs]``, NaN where unknown) reaches policies that read it.
        """
        if first_entropy is not None:
            self.observe_first_entropy(slots, first_entropy)
        steps = self.policy.batch_steps_for(slots)
        return steps.clamp(self.min_runnable_steps, self.cfg.max_steps)

    def observe_first_entropy(self, slots: torch.Tensor, first_entropy: torch.Tensor) -> None:
        """The entropy of each request's first draft distribution for the coming round,
        for policies that read it (``plan`` passes it on; under a lagged decision the
        engine calls this alone)."""
        if self.policy.needs_first_entropy and slots.shape[0]:
            self.policy.observe_first_entropy(slots, first_entropy)

    def req_steps(self, slots: torch.Tensor) -> torch.Tensor:
        """``[bs]`` int64: each request's own SL for the coming round."""
        return self.policy.steps_for(slots)

    def observe(self, slots: torch.Tensor, drafted: torch.Tensor, accepted: torch.Tensor, *,
                kl: Optional[torch.Tensor] = None,
                temperature: Optional[torch.Tensor] = None,
                draft_entropy: Optional[torch.Tensor] = None,
                batch_size: Optional[int] = None) -> PolicyDecision:
        """One verify round (``SpecPolicy.update``'s contract); returns the decision."""
        return self.policy.update(slots, drafted, accepted, req_kl=kl,
                                  req_temperature=temperature,
                                  req_draft_entropy=draft_entropy, batch_size=batch_size)

    def observe_cost(self, batch_size: int, batch_steps: int, seconds: float,
                     catch_up: float = 0.0) -> None:
        """The cost of the round just played (host numbers), which ran ``catch_up``
        catch-up tokens before drafting (``core.round_cost``)."""
        self.policy.observe_round(batch_size, batch_steps, seconds, catch_up)

    def observe_pending_catch_up(self, tokens: float) -> None:
        """Catch-up tokens the coming round pays if it drafts (before ``plan``)."""
        self.policy.observe_pending_catch_up(tokens)

    def describe(self) -> dict:
        return self.policy.describe()
