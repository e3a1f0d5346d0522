"""Baseline policies behind the same interface: a static SL, and SGLang's in-tree rule.

``static``: every request always gets the initial SL (``--speculative-num-steps``).

``sglang_adaptive``: the semantics of SGLang 0.5.23's ``--speculative-adaptive``
(``AdaptiveSpeculativeParams`` / ``AdaptiveStepSlot``), re-implemented on device tensors:

* One *tier* per configured batch size (default 1, 8, 32, 64); a batch of size ``bs``
  is routed to the largest tier ``<= bs`` (the smallest tier when none is). CUDA-graph
  padding of the batch size is not modelled (the caller may pass the padded size).
* Each tier holds one SL for the whole batch, chosen from its sorted candidate steps
  (start: the initial SL if it is a candidate, else the middle candidate), and an EMA of
  accepted drafts per request (start: SL - 1; ``ema_alpha`` 0.2), updated after every
  round of that tier while its SL is > 0.
* After ``warmup_batches`` (10) rounds of the tier, every ``update_interval`` (5) rounds:
  from a zero SL, probe the next candidate (and, if the EMA is negative, restart it at
  that candidate - 1). Otherwise step down while ``ema <= threshold(lower candidate)``
  with threshold ``c - 0.5`` (``0.5`` for c = 0) ``+ down_hysteresis``; if it did not step
  down, step up while ``ema > c - 0.5 + up_hysteresis``; with ``ceiling_coeff > 0`` a
  move that does not go up is limited to candidates ``<= max(1, ceil(ema * coeff))``.

Difference from SGLang, on purpose: candidate steps are snapped to the step counts this
project's engine has a runtime state for (``config.state_steps_for``: the largest not
above the candidate, never below the smallest), so with the default ``min_steps`` 2 the
tiers' 0 and 1 become 2, and with the default states (0 1 2 3 4 6 10) 5 and 7 become 4
and 6. With ``state_steps`` covering SGLang's candidates the tiers are SGLang's.
The step thresholds are monotone in the candidate index, so each walk of SGLang's loops
equals a count of satisfied thresholds, which is how it runs here without a host sync.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ...config import state_steps_for
from .base import RoundObservation, SpecPolicy

#: SGLang 0.5.23's default tiers (``DEFAULT_ADAPTIVE_CONFIG``), restated as data.
SGLANG_DEFAULT_TIERS = {
    1: dict(candidate_steps=[1, 3, 5, 7], up_hysteresis=0.0, down_hysteresis=-0.25),
    8: dict(candidate_steps=[0, 1, 3], up_hysteresis=0.0, down_hysteresis=0.0),
    32: dict(candidate_steps=[0, 1], up_hysteresis=0.0, down_hysteresis=0.0),
    64: dict(candidate_steps=[0], up_hysteresis=0.0, down_hysteresis=0.0),
}
_TIER_DEFAULTS = dict(ema_alpha=0.2, update_interval=5, warmup_batches=10,
                      down_hysteresis=-0.25, up_hysteresis=0.0, ceiling_coeff=0.0)


class StaticPolicy(SpecPolicy):
    """Every request drafts the initial SL, always."""

    name = "static"

    def _step(self, obs: RoundObservation):
        return self.req_steps[obs.slots], None


class _Tier:
    """Host-side constants of one tier; its changing state lives in device tensors."""

    def __init__(self, entry: Mapping, runnable: tuple, initial: int):
        opts = {**_TIER_DEFAULTS, **entry}
        cands = sorted({max([s for s in runnable if s <= int(c)] or [runnable[0]])
                        for c in opts["candidate_steps"]})
        self.candidates = cands
        self.ema_alpha = float(opts["ema_alpha"])
        self.update_interval = int(opts["update_interval"])
        self.warmup_batches = int(opts["warmup_batches"])
        self.ceiling_coeff = float(opts["ceiling_coeff"])
        self.initial_index = cands.index(initial) if initial in cands else len(cands) // 2
        self.down_thresholds = [(0.5 if c == 0 else c - 0.5) + opts["down_hysteresis"]
                                for c in cands]
        self.up_thresholds = [c - 0.5 + opts["up_hysteresis"] for c in cands]
        #: Rounds seen by this tier: host-side bookkeeping (one per call), not data.
        self.batch_count = 0


class SGLangAdaptivePolicy(SpecPolicy):
    """SGLang's batch-level EMA/tier/hysteresis rule (see module docstring)."""

    name = "sglang_adaptive"

    def __init__(self, cfg, *, max_slots: int, device, initial_steps: int,
                 tiers: Optional[Mapping[int, Mapping]] = None):
        super().__init__(cfg, max_slots=max_slots, device=device, initial_steps=initial_steps)
        tiers = SGLANG_DEFAULT_TIERS if tiers is None else tiers
        self.tier_sizes = sorted(int(bs) for bs in tiers)
        runnable = state_steps_for(cfg, initial_steps)
        self.tiers = [_Tier(tiers[bs], runnable, initial_steps) for bs in self.tier_sizes]
        dev = self.device
        width = max(len(t.candidates) for t in self.tiers)
        self._cands = torch.tensor([t.candidates + [t.candidates[-1]] * (width - len(t.candidates))
                                    for t in self.tiers], dtype=torch.int64, device=dev)
        self._down = [torch.tensor(t.down_thresholds, dtype=torch.float64, device=dev)
                      for t in self.tiers]
        self._up = [torch.tensor(t.up_thresholds, dtype=torch.float64, device=dev)
                    for t in self.tiers]
        self.tier_index = torch.tensor([t.initial_index for t in self.tiers],
                                       dtype=torch.int64, device=dev)
        self.tier_ema = torch.tensor([float(t.candidates[t.initial_index] - 1)
                                      for t in self.tiers], dtype=torch.float64, device=dev)

    def tier_of(self, batch_size: int) -> int:
        """Index of the tier serving batches of ``batch_size`` (a host int: a shape)."""
        # A plain count (not bisect): traceable by torch.compile, and there are few tiers.
        return max(0, sum(1 for size in self.tier_sizes if size <= batch_size) - 1)

    def tier_steps(self, tier: int) -> torch.Tensor:
        """``[1]`` int64: the current SL of a tier.

        State is indexed with 1-element tensors, never 0-dim ones: a 0-dim tensor used as
        an index is converted to a Python int, i.e. a host synchronisation."""
        return self._cands[tier][self.tier_index[tier:tier + 1]]

    def steps_for(self, slots: torch.Tensor) -> torch.Tensor:
        bs = slots.shape[0]
        return self.tier_steps(self.tier_of(bs)).expand(bs).clone()

    def _step(self, obs: RoundObservation):
        """Routes by ``obs.batch_size`` (``update(batch_size=...)``: pass the CUDA-graph
        padded size to mirror SGLang exactly when graphs are on)."""
        bs = int(obs.slots.shape[0])
        t = self.tier_of(obs.batch_size)
        tier = self.tiers[t]
        idx = self.tier_index[t:t + 1]
        steps = self._cands[t][idx]
        ema = self.tier_ema[t:t + 1]
        batch_avg = obs.accepted.sum().double() / bs
        ema = torch.where(steps > 0, (1 - tier.ema_alpha) * ema + tier.ema_alpha * batch_avg,
                          ema)
        tier.batch_count += 1
        past_warmup = tier.batch_count > tier.warmup_batches
        if past_warmup and (tier.batch_count - tier.warmup_batches) % tier.update_interval == 0:
            idx, ema = self._recompute(t, idx, ema)
        self.tier_ema[t:t + 1] = ema
        self.tier_index[t:t + 1] = idx
        return self._cands[t][idx].expand(bs).clone(), None

    def _recompute(self, t: int, idx: torch.Tensor, ema: torch.Tensor) -> tuple:
        tier = self.tiers[t]
        last = len(tier.candidates) - 1
        cands = self._cands[t][:last + 1]
        old_steps = cands[idx]
        pos = torch.arange(last + 1, device=self.device)
        # From zero steps: probe the next candidate, restarting a negative EMA there.
        probe_idx = (idx + 1).clamp_max(last)
        probe_steps = cands[probe_idx]
        probe_ema = torch.where((probe_steps > 0) & (ema < 0), (probe_steps - 1).double(), ema)
        # Down: candidates below idx whose threshold the EMA is at or under.
        num_down = ((pos < idx) & (ema <= self._down[t])).sum()
        # Up (only when not moving down): thresholds of idx .. last-1 the EMA exceeds.
        num_up = ((pos >= idx) & (pos < last) & (ema > self._up[t])).sum()
        new_idx = torch.where(num_down > 0, idx - num_down, idx + num_up)
        if tier.ceiling_coeff > 0:
            ceiling = torch.ceil(ema * tier.ceiling_coeff).clamp_min(1)
            target = cands[new_idx]
            limited = (cands <= ceiling).sum().sub(1).clamp_min(0)
            new_idx = torch.where((target > ceiling) & (target <= old_steps), limited, new_idx)
        is_zero = old_steps == 0
        return torch.where(is_zero, probe_idx, new_idx), torch.where(is_zero, probe_ema, ema)
