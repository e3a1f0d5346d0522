"""The speculation-length policy interface: one implementation per policy, stepped by one
driver (``core.driver.PolicyDriver``) for the engine, the simulator and the replay.

Per-request state lives in device tensors indexed by *slot* (an int in ``[0, max_slots)``,
SGLang's ``req_pool_indices``). A round, as the driver calls it::

    policy.observe_first_entropy(slots, entropy)   # only when needs_first_entropy
    steps = policy.batch_steps_for(slots)          # the batch's step count (default: max)
    req_steps = policy.steps_for(slots)            # [bs] SL of each request this round
    ... draft ``steps`` steps, verify ...
    decision = policy.update(slots, req_num_drafted, req_num_accepted,
                             req_kl=kl, req_temperature=temps)
    # or, when no request drafted (the off state): decision = policy.update_off(slots)
    policy.observe_round(sample)                   # the round's measured cost, a device
                                                   # tensor [bs, steps, seconds, verified,
                                                   # catch-up]
    ... when requests finish or abort:
    policy.reset_slots(finished_slots)

Contract of ``update`` (tensors on any device, ``bs`` = ``len(slots)``):

* ``slots``: ``[bs]`` int64, distinct, each in ``[0, max_slots)``.
* ``req_num_drafted``: ``[bs]`` drafted tokens of each request this round (>= 0).
* ``req_num_accepted``: ``[bs]`` accepted drafted tokens (0 .. drafted; the bonus token
  is not counted; larger values are clipped to ``drafted``).
* ``req_kl``: ``[bs, P]`` KL per drafted position (``kl.kl_per_position``); values at
  positions ``>= req_num_drafted`` are ignored (even NaN). Required when ``needs_kl``.
* ``req_temperature``: ``[bs]``, 0 for greedy requests (default: all greedy).
* ``req_draft_entropy``: ``[bs, P]`` draft entropies; required when
  ``needs_draft_entropy``.

The shared preamble (``update`` here) validates and converts the inputs once, then calls
the policy's ``_step`` with a ``RoundObservation``. A request whose drafted KL is not
finite (NaN/inf logits) has its signal *skipped*: the policy sees it as having drafted
nothing, and its next SL falls back to the initial SL. Each request's SL for its next
round is stored, so ``steps_for`` of a later batch returns it (a fresh or reset slot
returns the initial SL). No host synchronisation happens in ``steps_for``, ``update`` or
``reset_slots``: the engine reads the batch decision once per round.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...config import DSDEConfig
from ..state import KLHistory
from ..wvir import decay_weights


class PolicyDecision(NamedTuple):
    """The outcome of one verify round for one batch (all on the policy's device)."""

    #: ``[bs]`` int64: each request's SL for its next round (capped where capping applies).
    req_steps: torch.Tensor
    #: 0-dim int64: the batch's step count, ``max(req_steps)`` (0 for an empty batch) unless
    #: the policy says otherwise (goodput with a ragged verify: the runtime state it drafts).
    batch_steps: torch.Tensor
    #: 0-dim int64: the batch cap, or -1 when no request was capped or capping is off.
    cap: torch.Tensor
    #: 0-dim int64: requests of the round whose signal was skipped (non-finite KL).
    num_skipped: torch.Tensor


class RoundObservation(NamedTuple):
    """One verify round as a policy's ``_step`` sees it (validated, on the device)."""

    slots: torch.Tensor          # [bs] int64
    drafted: torch.Tensor        # [bs] int64 (0 where the signal was skipped)
    accepted: torch.Tensor       # [bs] int64, <= drafted
    kl: torch.Tensor             # [bs, P] float64, 0 at undrafted positions
    is_drafted: torch.Tensor     # [bs, P] bool
    temperature: torch.Tensor    # [bs] float64
    draft_entropy: Optional[torch.Tensor]  # [bs, P] float64 or None
    batch_size: int              # the batch size the engine ran (routing, e.g. tiers)


class SpecPolicy:
    """Base class: config, slot-indexed current SL, and the shared ``update`` preamble."""

    #: Registry name (``DSDEConfig.policy``).
    name = ""
    #: Whether ``update`` reads ``req_kl`` (the engine computes KL only when it does).
    needs_kl = False
    #: Whether ``update`` reads ``req_draft_entropy``.
    needs_draft_entropy = False
    #: Whether the policy reads ``observe_first_entropy``.
    needs_first_entropy = False
    #: Whether the policy reads ``observe_round`` (the engine times rounds only then).
    needs_round_cost = False

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
        return self.req_steps[self._ints(slots)]

    def observe_first_entropy(self, slots: torch.Tensor,
                              req_first_entropy: torch.Tensor) -> None:
        """``[bs]`` entropy (nats) of each request's first draft distribution for the
        coming round (known before drafting; NaN: unknown). Default: ignored."""

    def batch_steps_for(self, slots: torch.Tensor) -> torch.Tensor:
        """0-dim int64: the step count a batch of ``slots`` drafts in the coming round.

        Default: the largest SL of the batch (0 for an empty batch).
        """
        req_steps = self.steps_for(slots)
        if req_steps.numel() == 0:
            return torch.zeros((), dtype=torch.int64, device=self.device)
        return req_steps.max()

    def observe_round(self, sample: torch.Tensor) -> None:
        """A measured round: ``sample`` = ``[batch size, steps, seconds, verified,
        catch-up]`` float64 on the policy's device (``verified``: the drafted tokens the
        target verified; ``catch-up``: the tokens its catch-up extended;
        ``round_cost.round_sample`` builds one from host numbers). Default: ignored."""

    def observe_pending_catch_up(self, tokens: float) -> None:
        """Catch-up tokens the coming round pays if it drafts (host number: requests
        that skipped rounds; ``core.round_cost``). Default: ignored."""

    def describe(self) -> dict:
        """Server-wide learned state for humans (``/server_info``; reads the device, so
        never call it in the round path). Default: nothing."""
        return {}

    def reset_slots(self, slots: torch.Tensor) -> None:
        """Forget the requests in ``slots`` (finished or aborted); batched."""
        self.req_steps[self._ints(slots)] = self.initial_steps

    def update(self, slots: torch.Tensor, req_num_drafted: torch.Tensor,
               req_num_accepted: torch.Tensor, *, req_kl: Optional[torch.Tensor] = None,
               req_temperature: Optional[torch.Tensor] = None,
               req_draft_entropy: Optional[torch.Tensor] = None,
               batch_size: Optional[int] = None) -> PolicyDecision:
        """Feed one verify round (module docstring); ``batch_size`` is the size the engine
        ran, when it differs from ``len(slots)`` (a CUDA-graph padded size)."""
        if self.needs_kl and req_kl is None:
            raise ValueError(f"the {self.name} policy needs req_kl (KL per drafted position)")
        if self.needs_draft_entropy and req_draft_entropy is None:
            raise ValueError(f"the {self.name} policy needs req_draft_entropy")
        slots = self._ints(slots)
        bs = int(slots.shape[0])
        if bs == 0:
            return self._decision(self.req_steps[slots])
        drafted = self._ints(req_num_drafted).reshape(bs)
        width = int(req_kl.reshape(bs, -1).shape[1]) if req_kl is not None else 0
        if req_draft_entropy is not None:
            width = max(width, int(req_draft_entropy.reshape(bs, -1).shape[1]))
        is_drafted = drafted_mask(drafted, width)
        kl = self._masked(req_kl, is_drafted, bs)
        entropy = (self._masked(req_draft_entropy, is_drafted, bs)
                   if req_draft_entropy is not None else None)
        finite = torch.isfinite(kl).all(dim=1)
        if entropy is not None:
            finite &= torch.isfinite(entropy).all(dim=1)
        # A skipped signal: the policy sees a request that drafted nothing.
        drafted = torch.where(finite, drafted, 0)
        is_drafted &= finite.unsqueeze(1)
        kl = torch.where(is_drafted, kl, 0.0)
        if entropy is not None:
            entropy = torch.where(is_drafted, entropy, 0.0)
        accepted = torch.minimum(self._ints(req_num_accepted).reshape(bs), drafted)
        obs = RoundObservation(slots, drafted, accepted, kl, is_drafted,
                               self._floats(req_temperature, (bs,)).reshape(bs), entropy,
                               bs if batch_size is None else int(batch_size))
        req_steps, cap, *batch_steps = self._step(obs)
        req_steps = torch.where(finite, req_steps, self.initial_steps)
        self.req_steps[slots] = req_steps
        return self._decision(req_steps, cap, (~finite).sum(), *batch_steps)

    def update_off(self, slots: torch.Tensor,
                   batch_size: Optional[int] = None) -> PolicyDecision:
        """A round in which no request drafted (the off state): ``update`` with every
        request drafting nothing, without a signal to validate. The same decision as
        ``update(slots, 0, 0, req_kl=[bs, 0])``; a policy may make it cheaper
        (``_step_off``). (Goodput also keeps what only an off round has: the run of off
        rounds, which spaces its reviews and spreads the pending catch-up, and that
        catch-up, which a round through ``update``, a drafting one, pays.)"""
        slots = self._ints(slots)
        bs = int(slots.shape[0])
        if bs == 0:
            return self._decision(self.req_steps[slots])
        req_steps, cap, *batch_steps = self._step_off(
            slots, bs if batch_size is None else int(batch_size))
        self.req_steps[slots] = req_steps
        return self._decision(req_steps, cap, None, *batch_steps)

    def _step_off(self, slots: torch.Tensor, batch_size: int) -> tuple:
        """``_step`` of a round in which nothing was drafted (default: ``_step`` on an
        empty observation)."""
        bs = int(slots.shape[0])
        none = torch.zeros(bs, dtype=torch.int64, device=self.device)
        empty = torch.zeros(bs, 0, dtype=torch.float64, device=self.device)
        return self._step(RoundObservation(
            slots, none, none, empty, torch.zeros(bs, 0, dtype=torch.bool, device=self.device),
            torch.zeros(bs, dtype=torch.float64, device=self.device),
            empty if self.needs_draft_entropy else None, batch_size))

    def _step(self, obs: RoundObservation) -> tuple:
        """``([bs] next SL of each request, 0-dim cap or None)`` for one round, and
        optionally the batch's 0-dim step count when it is not the largest SL (a ragged
        verify drafts a runtime state that holds every request's length)."""
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------

    def _ints(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(device=self.device, dtype=torch.int64)

    def _floats(self, values: Optional[torch.Tensor], shape: tuple) -> torch.Tensor:
        """float64 copy on the device, or zeros of ``shape`` when ``values`` is None."""
        if values is None:
            return torch.zeros(shape, dtype=torch.float64, device=self.device)
        return values.to(device=self.device, dtype=torch.float64)

    def _masked(self, values: Optional[torch.Tensor], is_drafted: torch.Tensor,
                bs: int) -> torch.Tensor:
        """``[bs, P]`` float64 with 0 at undrafted positions (whatever they held)."""
        out = torch.zeros(is_drafted.shape, dtype=torch.float64, device=self.device)
        if values is not None:
            values = self._floats(values, ()).reshape(bs, -1)
            out[:, :values.shape[1]] = values
        return torch.where(is_drafted, out, 0.0)

    def _decision(self, req_steps: torch.Tensor, cap: Optional[torch.Tensor] = None,
                  num_skipped: Optional[torch.Tensor] = None,
                  batch_steps: Optional[torch.Tensor] = None) -> PolicyDecision:
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        if batch_steps is None:
            batch_steps = req_steps.max() if req_steps.numel() else zero
        if cap is None:
            cap = torch.full((), -1, dtype=torch.int64, device=self.device)
        return PolicyDecision(req_steps, batch_steps, cap,
                              zero if num_skipped is None else num_skipped)


class KLHistoryPolicy(SpecPolicy):
    """A policy that keeps each request's KL history (``state.KLHistory``, the last
    ``window`` drafted-token values) and the age weights of its stability (WVIR)."""

    def __init__(self, cfg: DSDEConfig, *, max_slots: int, device, initial_steps: int):
        super().__init__(cfg, max_slots=max_slots, device=device, initial_steps=initial_steps)
        self.history = KLHistory(self.max_slots, cfg.window, self.device)
        self.weight_by_age = decay_weights(cfg.decay, cfg.window, self.device)

    def reset_slots(self, slots: torch.Tensor) -> None:
        super().reset_slots(slots)
        self.history.reset(self._ints(slots))


def drafted_mask(req_num_drafted: torch.Tensor, num_pos: int) -> torch.Tensor:
    """``[bs, num_pos]`` bool: position j of request i was drafted."""
    pos = torch.arange(num_pos, device=req_num_drafted.device).unsqueeze(0)
    return pos < req_num_drafted.unsqueeze(1)
