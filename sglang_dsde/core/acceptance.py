"""What the engine's verify rounds teach about acceptance, batched and on the device.

A verify round of request i drafts ``n_i`` tokens and accepts ``a_i`` of them. The
acceptance of draft position j (0-based) is *observed* for ``j <= a_i`` (accepted for
``j < a_i``, rejected at ``j = a_i`` when ``a_i < n_i``); later positions are censored.

``AcceptanceCalibration`` keeps the server-wide statistics, forgotten per round that
observed something (``MEMORY``; a stretch of off rounds keeps what was learned), each
with a weak prior (pseudo-observations):

* ``calibrate(kl)``: P(accept | KL) by KL bin (``KL_EDGES``, log-spaced), learned from
  observed positions: turns a request's recent KL values into an acceptance estimate;
* ``rate``: the acceptance rate over all observed positions (a new request's prior);
* the depth profiles ``h[b, j]`` = P(position j accepted | positions < j accepted) for
  rounds whose *first draft distribution* had its entropy in bin b (``ENTROPY_EDGES``).
  That distribution exists before the round (the previous round's draft extend made
  it), so its entropy is the one signal about *this* round known when the step count is
  chosen: a confident first draft is accepted far more often, and for longer (on the
  recorded traces, docs/goodput.md, its quartiles split the mean accepted run widely).
  Rows share the all-rounds profile as their prior; real acceptance comes in runs (a
  draft that agreed twice is likelier to agree again), which the depth axis captures.

``survival(p, first_entropy)`` gives ``S[i, j]`` = P(draft positions 0..j all accepted)
``= prod_{m <= j} h[b_i, m] ** rho_i`` with ``rho_i = (log p_i / log rate) ** w``: a
request whose history sits at the server's rate gets its bin's profile, a better one a
flatter profile (``w`` = ``history_weight``). The expected tokens of a round of k drafts
are ``1 + sum_{j < k} S[i, j]``.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Upper edges of the KL bins (the last bin is open): 0, then 1e-3 .. 10 in half decades.
KL_EDGES = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
#: Upper edges of the first-draft entropy bins, in nats (the last bin is open).
ENTROPY_EDGES = (0.05, 0.15, 0.3, 0.6, 1.0, 1.5, 2.0, 3.0, 4.0, 5.5)
#: Pseudo-observations behind each prior value.
PRIOR_WEIGHT = 2.0
#: Prior server acceptance rate (a mediocre draft).
PRIOR_RATE = 0.5
#: Forgetting factor per round of the server-wide statistics.
MEMORY = 0.98
#: Rates are kept inside [EPS, 1 - EPS] before logarithms.
EPS = 1e-3


def observed_positions(num_drafted: torch.Tensor, num_accepted: torch.Tensor,
                       num_pos: int) -> tuple:
    """``(observed, accepted)`` ``[bs, num_pos]`` bool masks (module docstring)."""
    pos = torch.arange(num_pos, device=num_drafted.device).unsqueeze(0)
    accepted = pos < num_accepted.unsqueeze(1)
    observed = accepted | ((pos == num_accepted.unsqueeze(1)) & (pos < num_drafted.unsqueeze(1)))
    return observed, accepted


class AcceptanceCalibration:
    """Server-wide acceptance statistics (module docstring) for ``max_steps`` positions.

    Counts are pure data, forgotten per round; priors are added when read, so a count
    that has faded returns its estimate to the prior. A depth's prior is the current
    ``rate``: a depth the policy has not drafted lately is assumed neither better nor
    worse than the rest (a fixed prior there would lock the policy out of it).
    """

    def __init__(self, max_steps: int, device):
        dev = self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=dev)
        self.kl_edges = torch.tensor(KL_EDGES, **f64)
        # KL bin prior: a decreasing guess exp(-KL at the bin's lower edge).
        self._kl_prior = torch.exp(-torch.cat([torch.zeros(1, **f64), self.kl_edges]))
        self._kl_acc = torch.zeros_like(self._kl_prior)
        self._kl_obs = torch.zeros_like(self._kl_prior)
        self.entropy_edges = torch.tensor(ENTROPY_EDGES, **f64)
        # One row per entropy bin, and a last row for rounds whose entropy is unknown
        # (they count toward the rate and the all-rounds profile, never as a bin).
        self._unknown_row = len(ENTROPY_EDGES) + 1
        shape = (len(ENTROPY_EDGES) + 2, max_steps)
        self._depth_acc = torch.zeros(shape, **f64)
        self._depth_obs = torch.zeros(shape, **f64)

    @property
    def rate(self) -> torch.Tensor:
        """0-dim: the acceptance rate over observed positions (all depths)."""
        rate = ((self._depth_acc.sum() + PRIOR_WEIGHT * PRIOR_RATE)
                / (self._depth_obs.sum() + PRIOR_WEIGHT))
        return rate.clamp(EPS, 1 - EPS)

    def depth_profiles(self) -> tuple:
        """``(all rounds [max_steps], by first-draft entropy bin [bins, max_steps])``."""
        rate = self.rate
        overall = ((self._depth_acc.sum(dim=0) + PRIOR_WEIGHT * rate)
                   / (self._depth_obs.sum(dim=0) + PRIOR_WEIGHT))
        by_bin = ((self._depth_acc + PRIOR_WEIGHT * overall)
                  / (self._depth_obs + PRIOR_WEIGHT))
        return overall.clamp(EPS, 1 - EPS), by_bin.clamp(EPS, 1 - EPS)

    def calibrate(self, kl: torch.Tensor) -> torch.Tensor:
        """P(accept | KL), element-wise (float64)."""
        table = (self._kl_acc + PRIOR_WEIGHT * self._kl_prior) / (self._kl_obs + PRIOR_WEIGHT)
        return table[torch.bucketize(kl, self.kl_edges)]

    def _entropy_rows(self, first_entropy: torch.Tensor) -> tuple:
        known = ~torch.isnan(first_entropy)
        bins = torch.bucketize(torch.nan_to_num(first_entropy, nan=0.0), self.entropy_edges)
        return torch.where(known, bins, self._unknown_row), known

    def observe(self, kl: torch.Tensor, observed: torch.Tensor, accepted: torch.Tensor,
                first_entropy: Optional[torch.Tensor] = None) -> None:
        """One round: ``[bs, P]`` KL, the masks of ``observed_positions`` and ``[bs]``
        first-draft entropies (NaN or None: unknown). A round without drafted positions
        changes nothing (memory fades per observed round, not per round)."""
        if kl.shape[1] == 0:
            return
        obs, acc = observed.double(), accepted.double()
        memory = 1.0 - (1.0 - MEMORY) * observed.any().double()  # float64, no copy
        kl_bins = torch.bucketize(kl, self.kl_edges).reshape(-1)
        self._kl_obs = memory * self._kl_obs.index_add(0, kl_bins, obs.reshape(-1))
        self._kl_acc = memory * self._kl_acc.index_add(0, kl_bins, acc.reshape(-1))
        if first_entropy is None:
            first_entropy = torch.full(obs.shape[:1], float("nan"), dtype=torch.float64,
                                       device=self.device)
        rows, _ = self._entropy_rows(first_entropy.to(self.device, torch.float64))
        width = min(obs.shape[1], self._depth_obs.shape[1])
        pad = self._depth_obs.shape[1] - width
        self._depth_obs = memory * self._depth_obs.index_add(
            0, rows, torch.nn.functional.pad(obs[:, :width], (0, pad)))
        self._depth_acc = memory * self._depth_acc.index_add(
            0, rows, torch.nn.functional.pad(acc[:, :width], (0, pad)))

    def survival(self, req_rate: torch.Tensor, first_entropy: torch.Tensor, max_steps: int,
                 history_weight: float) -> torch.Tensor:
        """``[bs, max_steps]``: P(draft positions 0..j all accepted) for each request."""
        overall, by_bin = self.depth_profiles()
        rows, known = self._entropy_rows(first_entropy)
        profile = torch.where(known.unsqueeze(1), by_bin[rows], overall.unsqueeze(0))
        rho = (torch.log(req_rate.clamp(EPS, 1 - EPS)) / torch.log(self.rate)) ** history_weight
        cum_log_h = torch.cumsum(torch.log(profile[:, :max_steps]), dim=1)
        return torch.exp(rho.unsqueeze(1) * cum_log_h)
