"""A draft-entropy stopping baseline in the spirit of AdaEDL (arXiv 2410.18351).

AdaEDL stops drafting at the first position whose entropy-based lower bound on the
acceptance probability of the drafted token, ``b = 1 - sqrt(gamma * H_draft)``, falls
below a threshold ``lambda``, and adapts the threshold online. This engine cannot stop a
draft loop mid-way (it is one static, graph-captured loop per SL), so the rule is applied
one round late, per request:

* ``reach`` = the number of leading drafted positions of the last round whose bound
  passed the request's threshold; next SL = ``reach`` (+1 when every drafted position
  passed, to probe further), clamped to ``[min_steps, max_steps]``.
* The threshold is calibrated per request: ``lambda_i = adaedl_lambda - offset_i`` where
  ``offset_i`` is an EMA (weight ``adaedl_ema``) of the round's observed acceptance rate
  (accepted / drafted) minus its mean bound over drafted positions: a request whose
  drafts are accepted more often than the bound promises drafts further. Rounds with no
  drafted position leave it unchanged.

This is an approximation of AdaEDL, not a reproduction (its exact adaptation schedule is
not restated here); gamma, lambda and the EMA weight are untuned defaults. No batch cap.
Needs ``req_draft_entropy`` (``kl.kl_per_position(..., with_draft_entropy=True)``).
"""

from __future__ import annotations

import torch

from .base import RoundObservation, SpecPolicy


class AdaEDLPolicy(SpecPolicy):
    name = "adaedl"
    needs_draft_entropy = True

    def __init__(self, cfg, *, max_slots: int, device, initial_steps: int):
        super().__init__(cfg, max_slots=max_slots, device=device, initial_steps=initial_steps)
        self.offset = torch.zeros(self.max_slots, dtype=torch.float64, device=self.device)

    def reset_slots(self, slots: torch.Tensor) -> None:
        super().reset_slots(slots)
        self.offset[slots] = 0.0

    def _step(self, obs: RoundObservation):
        cfg = self.cfg
        drafted, accepted, is_drafted = obs.drafted, obs.accepted, obs.is_drafted
        entropy = obs.draft_entropy
        bound = 1.0 - torch.sqrt(cfg.adaedl_gamma * torch.where(is_drafted, entropy, 0.0)
                                 .clamp_min(0.0))
        threshold = cfg.adaedl_lambda - self.offset[obs.slots]
        passed = (bound >= threshold.unsqueeze(1)) & is_drafted
        # Leading run of passed positions: cumprod stays 1 until the first failure.
        reach = passed.long().cumprod(dim=1).sum(dim=1)
        probe = (reach == drafted).long()
        next_steps = (reach + probe).clamp(cfg.min_steps, cfg.max_steps)

        num = drafted.clamp_min(1).double()
        mean_bound = torch.where(is_drafted, bound, 0.0).sum(dim=1) / num
        surprise = accepted.double() / num - mean_bound
        old = self.offset[obs.slots]
        self.offset[obs.slots] = torch.where(
            drafted > 0, (1 - cfg.adaedl_ema) * old + cfg.adaedl_ema * surprise, old)
        return next_steps, None
