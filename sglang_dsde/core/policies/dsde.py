"""The DSDE policy (arXiv 2509.01083): per-request SL from KL stability, batch cap.

Exact semantics (docs/algorithm.md, "Exact semantics"); after each verify round, for each
request of the batch, in this order:

1. Append the round's KL values to the history ring (``KLHistory``); ``n_seen += drafted``.
2. Still warming up (``n_seen < W``): add the values to the warm-up statistics,
   ``max_acc = max(max_acc, accepted)``; if ``accepted >= k``, ``k = min(2k, max_steps)``
   (k = this policy's own current SL for the request). Not counted in the cap.
3. Otherwise, on the round where ``n_seen`` first reaches W: first add this round to the
   warm-up statistics, then fix the bounds once::

       k_max = clamp(round(max_acc * (1 + w * mean_kl / max_kl)), min_steps, max_steps)
       k_min = clamp(ceil(f * k_max), min_steps, k_max)

   (ratio 0 when max_kl is 0; w = ``kmax_kl_weight``, f = ``kmin_fraction``). From then on,
   every round: ``x = WVIR(hist) * SF`` with ``SF = exp(alpha * m_last) - 1``, ``m_last`` the
   mean KL of this round's drafted positions, divided by T when T > 0 (0 when nothing was
   drafted); ``k = max(k_min, ceil((k_max - k_min) * (1 - x) + k_min))`` if ``x <= 1``, else
   ``k_min``.

Then ``cap = ceil(mean(k_i))`` over the batch's requests past warm-up, each of which gets
``min(k_i, cap)`` (no such request, or ``batch_cap`` off: no cap). ``round`` is half to
even, ``ceil`` snaps within 1e-9 (``numerics``). The warm-up mean uses compensated
summation in arrival order (``numerics.neumaier_add_columns``).

State per slot (device tensors): the KL ring and ``n_seen``, the current SL, ``max_acc``,
the warm-up KL sum (value + compensation) and max, and the bounds.
"""

from __future__ import annotations

import torch

from ..numerics import ceil_tol, neumaier_add_columns
from ..wvir import wvir
from .base import KLHistoryPolicy, RoundObservation


class DSDEPolicy(KLHistoryPolicy):
    name = "dsde"
    needs_kl = True

    def __init__(self, cfg, *, max_slots: int, device, initial_steps: int):
        super().__init__(cfg, max_slots=max_slots, device=device, initial_steps=initial_steps)
        dev, slots = self.device, self.max_slots
        self.max_accepted = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.warm_kl_sum = torch.zeros(slots, dtype=torch.float64, device=dev)
        self.warm_kl_comp = torch.zeros(slots, dtype=torch.float64, device=dev)
        self.warm_kl_max = torch.zeros(slots, dtype=torch.float64, device=dev)
        self.k_min = torch.zeros(slots, dtype=torch.int64, device=dev)
        self.k_max = torch.zeros(slots, dtype=torch.int64, device=dev)

    def reset_slots(self, slots: torch.Tensor) -> None:
        super().reset_slots(slots)
        for t in (self.max_accepted, self.warm_kl_sum, self.warm_kl_comp, self.warm_kl_max,
                  self.k_min, self.k_max):
            t[slots] = 0

    def _step(self, obs: RoundObservation):
        cfg = self.cfg
        slots, drafted, accepted, kl = obs.slots, obs.drafted, obs.accepted, obs.kl
        temperature = obs.temperature

        # 1. history
        prev_seen = self.history.n_seen[slots]
        new_seen = self.history.append(slots, kl, drafted)
        window = cfg.window
        was_warming = prev_seen < window          # this round's values join warm_kls
        warming = new_seen < window               # still warming up after this round
        ends_warmup = was_warming & ~warming      # bounds are fixed in this round

        # 2. warm-up statistics (rows not warming before this round add zeros: no-op).
        warm_vals = torch.where(was_warming.unsqueeze(1), kl, 0.0)
        warm_sum, warm_comp = neumaier_add_columns(
            self.warm_kl_sum[slots], self.warm_kl_comp[slots], warm_vals)
        warm_max = self.warm_kl_max[slots]
        if kl.shape[1]:  # KL >= 0, so a max starting at 0 is the max of the values
            warm_max = torch.maximum(warm_max, warm_vals.amax(dim=1))
        max_acc = torch.where(was_warming, torch.maximum(self.max_accepted[slots], accepted),
                              self.max_accepted[slots])
        self.warm_kl_sum[slots] = warm_sum
        self.warm_kl_comp[slots] = warm_comp
        self.warm_kl_max[slots] = warm_max
        self.max_accepted[slots] = max_acc

        cur_steps = self.req_steps[slots]
        warm_steps = torch.where(warming & (accepted >= cur_steps),
                                 (2 * cur_steps).clamp_max(cfg.max_steps), cur_steps)

        # 3. bounds, fixed once in the round that ends warm-up.
        mean_kl = (warm_sum + warm_comp) / new_seen.clamp_min(1)
        ratio = torch.where(warm_max > 0, cfg.kmax_kl_weight * mean_kl / warm_max, 0.0)
        new_k_max = torch.round(max_acc * (1.0 + ratio)).clamp(cfg.min_steps, cfg.max_steps)
        new_k_min = torch.minimum(ceil_tol(cfg.kmin_fraction * new_k_max)
                                  .clamp_min(cfg.min_steps), new_k_max)
        k_max = torch.where(ends_warmup, new_k_max.long(), self.k_max[slots])
        k_min = torch.where(ends_warmup, new_k_min.long(), self.k_min[slots])
        self.k_max[slots] = k_max
        self.k_min[slots] = k_min

        # Prediction (computed for every row, used for rows past warm-up).
        age, count = self.history.ages(new_seen)
        stability = wvir(self.history.values[slots, :window], age, count, self.weight_by_age)
        m_last = kl.sum(dim=1) / drafted.clamp_min(1)
        m_last = torch.where(temperature > 0, m_last / torch.where(temperature > 0,
                                                                   temperature, 1.0), m_last)
        x = stability * (torch.exp(cfg.alpha * m_last) - 1.0)
        span = (k_max - k_min).double()
        interpolated = torch.maximum(k_min.double(), ceil_tol(span * (1.0 - x) + k_min))
        predicted = torch.where(x <= 1.0, interpolated, k_min.double()).long()

        # Batch cap over the requests past warm-up.
        past = ~warming
        cap = None
        final_past = predicted
        if cfg.batch_cap:
            num_past = past.sum()
            mean_pred = torch.where(past, predicted, 0).sum().double() / num_past.clamp_min(1)
            cap = torch.where(num_past > 0, ceil_tol(mean_pred).long(), -1)
            final_past = torch.where(cap >= 0, torch.minimum(predicted, cap), predicted)
        return torch.where(past, final_past, warm_steps), cap
