"""The cost-aware DSDE policy: the step count that maximises the batch's expected goodput.

It keeps the paper's signal (per-request KL and its stability, WVIR) but, instead of fixed
per-request bounds and a mean-based cap, turns it into an *expected number of tokens* per
request and picks, for the whole batch, the step count with the most expected tokens per
unit of expected round time::

    K* = argmax_{K in choices}  sum_i E_i(K) / cost(bs, K)
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
every ``K > 0`` with it, spread over the rounds the batch is expected to keep drafting
after it: a debt paid once, which those rounds share. That horizon is the length of the
off run behind it, at least ``RESUME_HORIZON`` rounds (requests that sat out ``n`` rounds
are expected to live about as many more: their age is the best guess of what remains).
Charged whole to one round, the debt of a long off run, which grows by a token per
request and round, would price every ``K > 0`` out for good: the longer off, the less
resuming could ever pay; spread over the run's length it costs about one catch-up token
per request and round, however long the run.

The decision is one of the step counts the engine has a runtime state for (``choices``:
``config.state_steps_for``), and it is *held*: the server keeps its current step count
unless another promises ``SWITCH_MARGIN`` more goodput for the batch at hand, so near-ties
do not flip the engine's runtime state back and forth.

Exploration: every ``goodput_probe_every`` rounds the batch drafts the next step count
above ``K*``, or the next below, alternately (among the choices); more often while few
rounds were played at the batch's size class (1, 2, 3-4, 5-8, ...), since costs, and so
``K*``, depend on it. While the server is off, each probe out of off after which it
stays off doubles the period (at most ``2 ** MAX_OFF_BACKOFF`` times; a success resets
it): a draft that never pays stops paying for probes.
Without it the estimates would only ever see the step count they chose: the cost model
could not tell the slope of the cost in k from its intercept, and the depth profile would
never see the depths beyond K* (nor, at K* = 0, any acceptance at all). Near the optimum
a neighbouring step count costs little.

All requests of the batch get ``K*`` (``req_steps``); the per-request cut does not apply
(it could only lose accepted tokens the round has already paid for).
"""

from __future__ import annotations

import torch

from ...config import state_steps_for
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
#: The held step count stays unless another runnable one promises this much more
#: expected goodput (relative) for the batch at hand: near-ties do not flip the state.
SWITCH_MARGIN = 0.03
#: A probe out of the off state that leaves the server off doubles the probe period
#: while off, at most this many times in a row (a success resets it).
MAX_OFF_BACKOFF = 3
#: While off, the held step count is reviewed (the estimates recomputed) at the first
#: off round after a drafting one and every this many off rounds after it, and whenever
#: the batch changed; the rounds between hold it (probes still fire on schedule). An off
#: round teaches the estimates almost nothing (a fade toward the server's rate, one more
#: sample of the off round's cost), and the review is most of the policy's work there.
OFF_REVIEW_EVERY = 4
#: The pending catch-up is priced as a debt spread over the off run's length in rounds,
#: at least this many (a resumed state holds a few rounds at least: the switch margin).
RESUME_HORIZON = 8


class GoodputPolicy(KLHistoryPolicy):
    name = "goodput"
    needs_kl = True
    needs_first_entropy = True
    needs_round_cost = True

    def __init__(self, cfg, *, max_slots: int, device, initial_steps: int):
        super().__init__(cfg, max_slots=max_slots, device=device, initial_steps=initial_steps)
        dev, slots = self.device, self.max_slots
        #: The step counts the engine can run (its pre-built states), sorted: the
        #: decision is always one of them, and a probe moves to a neighbour among them.
        self.choices = torch.tensor(state_steps_for(cfg, initial_steps), dtype=torch.int64,
                                    device=dev)
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
        #: Verify rounds seen per batch-size class (the exploration schedule; host ints,
        #: the same on every TP rank): what a round costs, and so which K pays, changes
        #: with the batch size, and the cost model knows a batch size only from rounds
        #: played at it.
        self.rounds_by_bs_class = [0] * (_bs_class(slots) + 1)
        #: The index (into ``choices``) of the step count the server holds: it moves only
        #: past ``SWITCH_MARGIN`` (``_held_choice``), once per verify round.
        initial = state_steps_for(cfg, initial_steps).index(initial_steps)
        self.held = torch.full((), initial, dtype=torch.int64, device=dev)
        #: Catch-up tokens the coming round pays if it drafts (host number).
        self.pending_catch_up = 0.0
        #: Per batch-size class: drafting rounds in a row, played while the server held
        #: the off state, after which it still held it (failed probes out of off); they
        #: space the next ones.
        self.off_misses = torch.zeros(len(self.rounds_by_bs_class), dtype=torch.int64,
                                      device=dev)
        #: Whether the lowest choice is the free off (``min_steps`` 0).
        self._has_off = state_steps_for(cfg, initial_steps)[0] == 0
        #: Off rounds in a row (host), and the last review: ``[batch key, survival,
        #: counts, its decision while no probe fired (else None)]``, the key ``(slot
        #: resets so far, batch size)``.
        self._off_rounds = 0
        self._slot_resets = 0
        self._reviewed = None

    def reset_slots(self, slots: torch.Tensor) -> None:
        super().reset_slots(slots)
        self._slot_resets += 1  # the batch changed: the next off round reviews
        for t in (self.kl_sum, self.obs_sum, self.obs_weight):
            t[slots] = 0
        self.stability[slots] = 1.0
        self.first_entropy[slots] = float("nan")

    def observe_round(self, sample: torch.Tensor) -> None:
        self.round_cost.observe(sample)

    def observe_pending_catch_up(self, tokens: float) -> None:
        self.pending_catch_up = float(tokens)

    def _catch_up_per_round(self) -> float:
        """The pending catch-up as a debt spread over the rounds expected to draft after
        it (module docstring; host numbers)."""
        return self.pending_catch_up / max(RESUME_HORIZON, self._off_rounds)

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

    def survival(self, slots: torch.Tensor) -> torch.Tensor:
        """``[bs, max_steps]``: P(draft positions 0..j all accepted) per request."""
        return self.calibration.survival(self.acceptance_rate(slots), self.first_entropy[slots],
                                         self.cfg.max_steps, HISTORY_WEIGHT)

    def expected_rates(self, slots: torch.Tensor) -> torch.Tensor:
        """``[max_steps + 1]`` float64: expected tokens per unit of cost for K = 0 .. max,
        every request verifying K drafts (a padded verify)."""
        cfg = self.cfg
        bs = int(slots.shape[0])
        zero = torch.zeros(1, dtype=torch.float64, device=self.device)
        tokens = bs + torch.cat([zero, self.survival(slots).sum(dim=0).cumsum(dim=0)])
        cost = self.round_cost.predict(bs, cfg.max_steps,
                                       catch_up=self._catch_up_per_round())
        return tokens / cost.clamp_min(1e-12)

    def ragged_rates(self, survival: torch.Tensor) -> tuple:
        """Per-request lengths (a ragged verify): for each K = 0 .. max, the best expected
        tokens per unit of cost when the batch drafts K steps and the target verifies the
        ``m`` drafted positions (among positions < K) with the largest survival, and that
        ``m``. Returns ``(rates [max + 1], m [max + 1])``.

        A request's survival falls with depth, so the ``m`` best positions are a prefix
        of each request's chain: the allocation DSpark's planner makes from a profiled
        table, here from the learned cost (``cost(bs, K, m) = base(bs, K) + dv * m``).
        """
        bs, width = survival.shape
        base = self.round_cost.predict(bs, width, unverified=True,
                                       catch_up=self._catch_up_per_round())
        per_token = self.round_cost.per_verified_token.clamp_min(0.0)
        gains = _gains_by_steps(survival)                                    # [K + 1, bs*K]
        best_first = gains.sort(dim=1, descending=True).values.clamp_min(0.0)
        tokens = bs + torch.cat([torch.zeros_like(best_first[:, :1]),
                                 best_first.cumsum(dim=1)], dim=1)          # m = 0 .. bs*K
        m = torch.arange(tokens.shape[1], device=self.device, dtype=torch.float64)
        steps = torch.arange(width + 1, device=self.device).unsqueeze(1)
        rates = tokens / (base.unsqueeze(1) + per_token * m).clamp_min(1e-12)
        rates = torch.where(m.unsqueeze(0) <= bs * steps, rates, -1.0)      # m <= bs * K
        best_rate, best_m = rates.max(dim=1)
        return best_rate, best_m

    def allocate(self, survival: torch.Tensor, steps: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
        """``[bs]`` lengths: the ``count`` positions < ``steps`` with the largest survival
        (ties: the shallower, then the earlier request)."""
        bs, width = survival.shape
        depth = torch.arange(width, device=self.device).expand(bs, width)
        gains = torch.where(depth < steps, survival, -1.0).reshape(-1)
        order = torch.sort(gains, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=self.device)
        chosen = (rank < count) & (gains >= 0)
        return chosen.reshape(bs, width).sum(dim=1)

    def observe_first_entropy(self, slots: torch.Tensor,
                              req_first_entropy: torch.Tensor) -> None:
        self.first_entropy[self._ints(slots)] = req_first_entropy.to(self.device,
                                                                      torch.float64)

    def _estimates(self, slots: torch.Tensor) -> tuple:
        """``(rates [max + 1], survival, counts)`` for this batch: expected tokens per
        unit of cost for each step count (with a ragged verify, at the best number of
        verified positions ``counts``; else ``survival`` and ``counts`` are None)."""
        if self.cfg.ragged_verify:
            survival = self.survival(slots)
            rates, counts = self.ragged_rates(survival)
            return rates, survival, counts
        return self.expected_rates(slots), None, None

    def _held_choice(self, rates: torch.Tensor) -> torch.Tensor:
        """0-dim index into ``choices``: the held step count, or the runnable one with the
        most expected goodput (``rates`` over step counts) where it beats the held one by
        more than ``SWITCH_MARGIN``."""
        rates = rates[self.choices]
        best = rates.argmax()
        held = self.held
        # (``take``: a 0-dim tensor as a Python index would read it back to the host.)
        better = rates.take(best) > rates.take(held) * (1.0 + SWITCH_MARGIN)
        return torch.where(better, best, held)

    def batch_steps_for(self, slots: torch.Tensor) -> torch.Tensor:
        slots = self._ints(slots)
        if slots.shape[0] == 0:
            return torch.zeros((), dtype=torch.int64, device=self.device)
        rates, survival, counts = self._estimates(slots)
        self._reviewed = None  # the lengths it writes are not the last review's
        return self._decide(slots, self._held_choice(rates), survival, counts)

    def _probe_periods(self, batch_size: int):
        """The probe periods this round's count of rounds is a multiple of, among those
        the schedule could be at (``_probed``), or None: the host knows that no probe
        fires this round. Host ints only."""
        cfg = self.cfg
        if not cfg.goodput_probe_every:
            return None
        num_rounds = self.rounds_by_bs_class[_bs_class(batch_size)]
        full = max(cfg.goodput_probe_every, 2)
        period = min(2 + num_rounds // 4, full)
        # Once the estimates are grown (the full period), each failed probe out of the
        # off state doubles the period while off (bounded; odd once backed off, so the
        # probes do not lock onto one phase of a periodic workload). The backoff is a
        # device value: the host screens every period it could make.
        backoffs = range(MAX_OFF_BACKOFF + 1) if self._has_off and period == full else (0,)
        periods = [(period << b) | 1 if b else period for b in backoffs]
        return periods if any(num_rounds % p == 0 for p in periods) else None

    def _probe_possible(self, batch_size: int) -> bool:
        return self._probe_periods(batch_size) is not None

    def _probed(self, choice: torch.Tensor, batch_size: int) -> tuple:
        """``(choice, probe up?)``: ``choice``, or on a probe round (the first of each
        period) a neighbour among the choices: the one above in even periods, below in
        odd ones, the only one there is at either end. One probe a period: two
        runtime-state switches (there and back). ``probe up?`` is None where the host
        knows no probe can fire this round (most rounds: no device work).

        The period is short while the estimates for this batch size are young (2, 3, ...
        growing by one every 4 rounds up to the knob): the first rounds teach the slope.
        Then, while off, it doubles with each probe out of off that failed in a row (up to
        ``2 ** MAX_OFF_BACKOFF`` times): a draft that never pays stops paying for
        probes, and one success brings the period back."""
        periods = self._probe_periods(batch_size)
        if periods is None:
            return choice, None
        size_class = _bs_class(batch_size)
        num_rounds, period = self.rounds_by_bs_class[size_class], periods[0]
        if len(periods) > 1:  # the period hangs on the device's backoff count
            misses = self.off_misses[size_class]
            backoff = torch.where(choice == 0, misses.clamp_max(MAX_OFF_BACKOFF), 0)
            period = torch.where(backoff > 0, (period << backoff) | 1, period)
        last = self.choices.shape[0] - 1
        up = (((num_rounds // period) % 2 == 0) | (choice == 0)) & (choice < last)
        probe = torch.where(up, choice + 1, (choice - 1).clamp_min(0))
        if len(periods) == 1:  # the one period divides the count: a probe round
            return probe, up
        on_probe = num_rounds % period == 0
        return torch.where(on_probe, probe, choice), on_probe & up

    def _decide(self, slots: torch.Tensor, choice: torch.Tensor, survival, counts
                ) -> torch.Tensor:
        """The batch's step count for ``choice`` (probes applied); with a ragged verify
        each request's length too (stored in ``req_steps``)."""
        choice, probe_up = self._probed(choice, int(slots.shape[0]))
        best = self.choices.take(choice)
        if survival is None:
            return best
        # Per-request lengths for the chosen step count; a probe up lengthens every
        # request by one (the depth beyond each one's optimum is what it teaches).
        lengths = self.allocate(survival, best, counts[best.reshape(1)])
        if probe_up is not None:
            lengths = torch.where(probe_up, (lengths + 1).clamp_max(best), lengths)
        self.req_steps[slots] = lengths
        # The batch drafts the smallest state that holds every length (at most ``best``).
        return self.choices.take((self.choices < lengths.max()).sum())

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
        # A round through ``update`` drafted (the engine, the simulator and the replay
        # send rounds that drafted nothing to ``update_off``): its catch-up is paid.
        self._off_rounds = 0
        self.pending_catch_up = 0.0
        if not self._has_off:
            return self._choose(slots)
        was_off = (self.held == 0) & (drafted > 0).any()
        out = self._choose(slots)
        # A drafting round while held off is a probe out of off: a miss if the server
        # stays off after it (the probe period while off doubles), else misses reset.
        stays_off = self.held == 0
        size_class = _bs_class(int(slots.shape[0]))
        misses = self.off_misses[size_class]
        self.off_misses[size_class] = torch.where(was_off & stays_off, misses + 1,
                                                  torch.where(stays_off, misses, 0))
        return out

    def _step_off(self, slots: torch.Tensor, batch_size: int):
        """No request drafted: only the fade of each request's sums (it advanced one
        token), then the decision; the calibration, the KL history and the stability
        see nothing (``_step`` on an empty round, in fewer operations). The estimates
        are reviewed at the first off round in a row and every ``OFF_REVIEW_EVERY``-th
        after it (and when the batch changed); the rounds between hold the reviewed
        decision."""
        fade = self.cfg.decay
        for t in (self.kl_sum, self.obs_sum, self.obs_weight):
            t[slots] = fade * t[slots]
        self._off_rounds += 1
        return self._choose(slots, review=(self._off_rounds - 1) % OFF_REVIEW_EVERY == 0)

    def _choose(self, slots: torch.Tensor, review: bool = True):
        """The round's decision for ``slots`` (the end of ``_step``). Without ``review``
        (an off round between reviews) the estimates of the last review stand, unless
        the batch changed since; where no probe can fire either, so does its decision."""
        bs = int(slots.shape[0])
        key = (self._slot_resets, bs)
        if review or self._reviewed is None or self._reviewed[0] != key:
            # What this round taught may move the held step count (once a round).
            rates, survival, counts = self._estimates(slots)
            self.held = self._held_choice(rates)
            self._reviewed = [key, survival, counts, None]
        _, survival, counts, unprobed = self._reviewed
        self.rounds_by_bs_class[_bs_class(bs)] += 1
        may_probe = self._probe_possible(bs)
        if unprobed is not None and not may_probe:
            steps = unprobed  # the same held choice, estimates and lengths as last round
        else:
            steps = self._decide(slots, self.held, survival, counts)
            self._reviewed[3] = None if may_probe else steps
        if survival is not None:  # ragged: each request's own length; the batch's state
            return self.req_steps[slots], None, steps
        return steps.expand(bs).clone(), None


def _gains_by_steps(survival: torch.Tensor) -> torch.Tensor:
    """``[K + 1, bs * K]``: for each step count k, the survival of every position < k
    (-1 at positions >= k, which a verify of k drafts cannot reach)."""
    bs, width = survival.shape
    depth = torch.arange(width, device=survival.device)
    steps = torch.arange(width + 1, device=survival.device).reshape(-1, 1, 1)
    return torch.where(depth < steps, survival.unsqueeze(0), -1.0).reshape(width + 1, -1)


def _bs_class(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, 9-16, ... -> 0, 1, 2, 3, 4, ... (host ints)."""
    return (int(batch_size) - 1).bit_length()
