"""The one driver of the policy protocol: the engine runtime, the simulator and the replay
all step a policy through ``PolicyDriver``, so a round means the same thing everywhere.

One round, in this order (any caller)::

    steps = driver.plan(slots, first_entropy)   # 0-dim: the batch's step count
    req_steps = driver.req_steps(slots)         # [bs]: each request's own SL (for a cut)
    ... draft, verify ...
    decision = driver.observe(slots, drafted, accepted, kl=..., temperature=..., ...)
    #   (or driver.observe_off(slots) for a round in which no request drafted)
    driver.observe_cost(sample)                 # the round's measured or modelled cost:
                                                #   round_cost.round_sample(bs, steps, s, T, g)
    ... requests join / leave: driver.admit(slots) / driver.release(slots)

``plan`` snaps the policy's batch decision to the step counts the engine can run
(``runnable_steps``: ``config.state_steps_for``, the pre-built runtime states): the
largest not above it, never below the smallest (``snap``). Everything is a device tensor;
nothing here reads a value back to the host (the caller decides when).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import DSDEConfig, initial_steps_for, state_steps_for
from .policies import PolicyDecision, SpecPolicy, make_policy


class PolicyDriver:
    """Steps one ``SpecPolicy`` (module docstring)."""

    def __init__(self, policy: SpecPolicy, *, runnable_steps: Optional[Sequence[int]] = None):
        self.policy = policy
        #: Sorted step counts the engine can run (default: the config's states).
        self.runnable_steps = tuple(sorted(
            runnable_steps if runnable_steps is not None
            else state_steps_for(policy.cfg, policy.initial_steps)))
        # snap_table[k]: the largest runnable step count <= k (the smallest for k below it).
        table = [max([s for s in self.runnable_steps if s <= k] or [self.runnable_steps[0]])
                 for k in range(self.cfg.max_steps + 1)]
        self._snap_table = torch.tensor(table, dtype=torch.int64, device=policy.device)

    @classmethod
    def build(cls, cfg: DSDEConfig, *, max_slots: int, device="cpu",
              static_steps: Optional[int] = None,
              runnable_steps: Optional[Sequence[int]] = None,
              **policy_kwargs) -> "PolicyDriver":
        """A driver of a fresh ``cfg.policy`` whose new requests start at
        ``config.initial_steps_for(cfg, static_steps)``."""
        policy = make_policy(cfg, max_slots=max_slots, device=device,
                             default_initial_steps=initial_steps_for(cfg, static_steps),
                             **policy_kwargs)
        return cls(policy, runnable_steps=runnable_steps)

    @property
    def min_runnable_steps(self) -> int:
        return self.runnable_steps[0]

    def snap(self, steps: torch.Tensor) -> torch.Tensor:
        """Step counts (any shape, int64, on the device) -> the runnable count each runs."""
        return self._snap_table.take(steps.clamp(0, self.cfg.max_steps))

    def snap_host(self, steps: int) -> int:
        """``snap`` for a host int."""
        return max([s for s in self.runnable_steps if s <= steps] or [self.runnable_steps[0]])

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
        return self.snap(self.policy.batch_steps_for(slots))

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

    def observe_off(self, slots: torch.Tensor,
                    batch_size: Optional[int] = None) -> PolicyDecision:
        """A round in which no request drafted (the off state; the caller knows it on
        the host): the decision ``observe`` gives for every request drafting nothing,
        without a signal to compute (``SpecPolicy.update_off``)."""
        return self.policy.update_off(slots, batch_size=batch_size)

    def observe_cost(self, sample: torch.Tensor) -> None:
        """The cost of the round just played: ``[batch size, steps, seconds, verified,
        catch-up]`` float64 on the policy's device (``verified``: the drafted tokens the
        target verified; ``catch-up``: the tokens its catch-up extended;
        ``round_cost.round_sample`` from host numbers)."""
        self.policy.observe_round(sample)

    def observe_pending_catch_up(self, tokens: float) -> None:
        """Catch-up tokens the coming round pays if it drafts (a host number, before
        ``plan``; ``core.round_cost.catch_up_tokens``)."""
        self.policy.observe_pending_catch_up(tokens)

    def describe(self) -> dict:
        return self.policy.describe()
