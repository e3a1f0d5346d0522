"""The cost-aware DSDE policy: the step count that maximises the batch's expected goodput.

It keeps the paper's signal (per-request KL and its stability, WVIR) but, instead of fixed
per-request bounds and a mean-based cap, turns it into an *expected number of tokens* per
request and picks, for the whole batch, the step count with the most expected tokens per
unit of expected round time::

    K* = argmax_{K in [min_steps, max_steps]}  sum_i E_i(K) / cost(bs, K)
    E_i(K) = 1 + sum_{j < K} S_i[j]              (S: ``AcceptanceCalibration.survival``)

Per request i (device tensors indexed by slot, forgotten per drafted token with ``decay``
as in the paper's weights):

* ``p_kl``: the decayed mean of P(accept | KL) over its observed positions (the
  KL-to-acceptance map is calibrated server-wide): a soft, lower-variance version of
* ``p_obs``: the decayed acceptance rate over the same positions;
* ``p = w * p_kl + (1 - w) * p_obs`` (``w`` = ``goodput_kl_weight``), both shrunk toward
  the server's rate by ``PRIOR_TOKENS`` pseudo-positions (a new request starts there);
* the stability discount: ``p ** (1 + lam * max(0, WVIR - 1))`` (``lam`` =
  ``goodput_stability_weight``): a request whose recent KL varies more than its longer
  history gets a lower, more cautious estimate. A flat history counts as stable (WVIR 1),
  unlike the paper's rule (20), because here the level of the KL already sets ``p``.

``cost`` is ``OnlineRoundCost``, fed by ``observe_round`` with the engine's round timings.
``K* = 0`` (the free off: a target-only round) is allowed when ``min_steps`` is 0. A batch
that was off owes its skipped tokens to the draft (the catch-up extend, paid by the first
round that drafts again): ``observe_pending_catch_up`` tells the decision, which prices
every ``K > 0`` with it, so resuming is weighed at what it costs.

Exploration: every ``goodput_probe_every`` rounds the batch drafts ``K* + 1``, and half a
period later ``K* - 1`` (within bounds); more often while few rounds were played at the
batch's size class (1, 2, 3-4, 5-8, ...), since costs, and so ``K*``, depend on it.
Without it the estimates would only ever see the step count they chose: the cost model
could not tell the slope of the cost in k from its intercept, and the depth profile would
never see the depths beyond K* (nor, at K* = 0, any acceptance at all). Near the optimum
a neighbouring step count costs little.

All requests of the batch get ``K*`` (``req_steps``); the per-request cut does not apply
(it could only lose accepted tokens the round has already paid for).
"""

from __future__ import annotations

import torch

from ..acceptance import AcceptanceCalibration, observed_positions
from ..round_cost import ROUND_COEFS, OnlineRoundCost
from ..wvir import wvir
from .base import KLHistoryPolicy, RoundObservation

#: Pseudo-positions at the server's rate behind each request's estimates.
PRIOR_TOKENS = 2.0
#: WVIR values above this count as this (the paper's flat-history value).
MAX_WVIR = 20.0
#: Exponent of the request's history in the survival profile (0: the first-draft entropy
#: alone; 1: the history's full log-ratio to the server's rate); docs/goodput.md has the
#: simulator's comparison of the choices.
HISTORY_WEIGHT = 0.5


class GoodputPolicy(KLHistoryPolicy):
    name = "goodput"
    needs_kl = True
    needs_first_entropy = True

    def __init__(self, cfg, *, max_slots: int, device, initial_steps: int):
        super().__init__(cfg, max_slots=max_slots, device=device, initial_steps=initial_steps)
        dev, slots = self.device, self.max_slots
        self.calibration = AcceptanceCalibration(cfg.max_steps, dev)
        self.round_cost = OnlineRoundCost(dev)
        zeros = dict(dtype=torch.float64, device=dev)
        #: Decayed sums per slot over observed positions: calibrated KL, acceptance, weight.
        self.kl_sum = torch.zeros(slots, **zeros)
        self.obs_sum = torch.zeros(slots, **zeros)
        self.obs_weight = torch.zeros(slots, **zeros)
        #: ``[slots]`` WVIR of each slot's KL history after its last drafted round.
        self.stability = torch.ones(slots, **zeros)
        #: ``[slots]`` entropy of each slot's first draft distribution for its coming round
        #: (NaN: unknown); set by ``observe_first_entropy``, read by the decision and
        #: by ``update``.
        self.first_entropy = torch.full((slots,), float("nan"), **zeros)
        #: Verify rounds seen per batch-size class (the exploration schedule): what a
        #: round costs, and so which K pays, changes with the batch size, and the cost
        #: model knows a batch size only from rounds played at it.
        self.rounds_by_bs_class = torch.zeros(_bs_class(slots) + 1, dtype=torch.int64,
                                              device=dev)
        #: Catch-up tokens the coming round pays if it drafts (host number).
        self.pending_catch_up = 0.0

    def reset_slots(self, slots: torch.Tensor) -> None:
        super().reset_slots(slots)
        for t in (self.kl_sum, self.obs_sum, self.obs_weight):
            t[slots] = 0
        self.stability[slots] = 1.0
        self.first_entropy[slots] = float("nan")

    def observe_round(self, batch_size: int, batch_steps: int, seconds: float,
                      catch_up: float = 0.0) -> None:
        self.round_cost.observe(batch_size, batch_steps, seconds, catch_up)

    def observe_pending_catch_up(self, tokens: float) -> None:
        self.pending_catch_up = float(tokens)

    def describe(self) -> dict:
        cost = self.round_cost
        return {
            "acceptance_rate": round(float(self.calibration.rate), 4),
            "timed_rounds": int(float(cost.num_samples)),
            "round_cost_coefs": {name: float(v) for name, v in
                                 zip(ROUND_COEFS, cost.coefs)},
        }

    # -- estimates and the decision --------------------------------------------------

    def acceptance_rate(self, slots: torch.Tensor) -> torch.Tensor:
        """``[bs]`` float64: each request's discounted per-position acceptance estimate."""
        cfg = self.cfg
        prior = self.calibration.rate
        weight = self.obs_weight[slots] + PRIOR_TOKENS
        p_kl = (self.kl_sum[slots] + PRIOR_TOKENS * prior) / weight
        p_obs = (self.obs_sum[slots] + PRIOR_TOKENS * prior) / weight
        p = cfg.goodput_kl_weight * p_kl + (1.0 - cfg.goodput_kl_weight) * p_obs
        excess = (self.stability[slots] - 1.0).clamp(0.0, MAX_WVIR)
        return p.clamp(0.0, 1.0) ** (1.0 + cfg.goodput_stability_weight * excess)

    def expected_rates(self, slots: torch.Tensor) -> torch.Tensor:
        """``[max_steps + 1]`` float64: expected tokens per unit of cost for K = 0 .. max."""
        cfg = self.cfg
        bs = int(slots.shape[0])
        survival = self.calibration.survival(self.acceptance_rate(slots),
                                             self.first_entropy[slots], cfg.max_steps,
                                             HISTORY_WEIGHT)
        zero = torch.zeros(1, dtype=torch.float64, device=self.device)
        tokens = bs + torch.cat([zero, survival.sum(dim=0).cumsum(dim=0)])
        cost = self.round_cost.predict(bs, cfg.max_steps, self.pending_catch_up)
        return tokens / cost.clamp_min(1e-12)

    def observe_first_entropy(self, slots: torch.Tensor,
                              req_first_entropy: torch.Tensor) -> None:
        self.first_entropy[self._ints(slots)] = req_first_entropy.to(self.device,
                                                                      torch.float64)

    def batch_steps_for(self, slots: torch.Tensor) -> torch.Tensor:
        slots = self._ints(slots)
        if slots.shape[0] == 0:
            return torch.zeros((), dtype=torch.int64, device=self.device)
        cfg = self.cfg
        rates = self.expected_rates(slots)[cfg.min_steps:]
        best = rates.argmax() + cfg.min_steps
        # Probe often while the estimates for this batch size are young (period 2, 3, ...
        # growing by one every 4 rounds up to the knob): the first rounds teach the slope.
        num_rounds = self.rounds_by_bs_class[_bs_class(int(slots.shape[0]))]
        period = torch.clamp(2 + num_rounds // 4, max=max(cfg.goodput_probe_every, 2))
        if cfg.goodput_probe_every:
            phase = num_rounds % period
            best = torch.where(phase == 0, (best + 1).clamp_max(cfg.max_steps), best)
            best = torch.where(phase == period // 2, (best - 1).clamp_min(cfg.min_steps), best)
        return best

    # -- one verify round ------------------------------------------------------------

    def _step(self, obs: RoundObservation):
        slots, drafted, accepted, kl = obs.slots, obs.drafted, obs.accepted, obs.kl
        bs = int(slots.shape[0])
        observed, is_accepted = observed_positions(drafted, accepted, kl.shape[1])

        # Per-request decayed sums over the observed positions (censored ones follow a
        # rejected token: their KL is that of an off-path context, biased high). Age is
        # counted in output tokens: the request advanced ``accepted + 1`` tokens, so old
        # values fade even in a round that drafted nothing; a request whose estimate fell
        # low enough to stop drafting drifts back to the server's rate instead of being
        # stuck there.
        decay = self.cfg.decay
        pos = torch.arange(kl.shape[1], device=self.device).unsqueeze(0)
        num_obs = observed.sum(dim=1)
        w_obs = torch.where(observed, decay ** (num_obs.unsqueeze(1) - 1 - pos)
                            .clamp_min(0).double(), 0.0)
        fade = decay ** (accepted + 1).double()
        calibrated = self.calibration.calibrate(kl)
        self.kl_sum[slots] = fade * self.kl_sum[slots] + (w_obs * calibrated).sum(dim=1)
        self.obs_sum[slots] = (fade * self.obs_sum[slots]
                               + (w_obs * is_accepted.double()).sum(dim=1))
        self.obs_weight[slots] = fade * self.obs_weight[slots] + w_obs.sum(dim=1)
        self.calibration.observe(kl, observed, is_accepted, self.first_entropy[slots])

        new_seen = self.history.append(slots, kl, drafted)
        age, count = self.history.ages(new_seen)
        values = self.history.values[slots, :self.cfg.window]
        ratio = wvir(values, age, count, self.weight_by_age, flat_value=1.0)
        self.stability[slots] = torch.where(drafted > 0, ratio, self.stability[slots])
        self.rounds_by_bs_class[_bs_class(bs)] += 1

        return self.batch_steps_for(slots).expand(bs).clone(), None


def _bs_class(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, 9-16, ... -> 0, 1, 2, 3, 4, ... (host ints)."""
    return (int(batch_size) - 1).bit_length()
