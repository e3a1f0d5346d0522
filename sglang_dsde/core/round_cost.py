"""The one round-cost protocol: features, world models, the online model, one NNLS solver.

A decode round of ``bs`` requests drafting ``k`` tokens each (``k = 0``: the free off, a
target-only round: no draft forward, no draft extend), after ``g`` catch-up tokens (the
draft extends each request's tokens it skipped while off, and the one it has not seen
since its prefill, before the round drafts; 0 when every request is current), costs::

    cost(bs, k, g) = k * d0                   # draft decode steps (the batch's fixed part)
                   + k * bs * d1              # one more drafted token of one request: its
                                              #   draft row, verify row and extend row
                   + v0 + v1 * bs             # the round itself, and each request in it
                   + [k > 0] * (e0 + e1 * bs) # fixed cost of a speculative round
                   + [k = 0] * n1 * bs        # an off round's own cost per request
                   + [k > 0] * g * c1         # the catch-up: a draft extend of g tokens

``round_feature_list`` gives the eight features; every cost model of the project speaks
this basis (``ROUND_COEFS``):

* ``LinearRoundCost``: a world model (the simulator's clock, a fit of the engine's round
  times); ``LinearRoundCost.from_parts`` builds one from physical parts (a draft step, a
  verify charged per verified token, a speculative overhead); ``sim.cost.fit_linear_cost``
  fits one to timings with the same solver;
* ``OnlineRoundCost``: what the goodput policy learns from the engine's own timings.

Why this basis: a request in the batch (``v1``: its own attention over its context, its
sampling and bookkeeping) costs far more than one more token of a request already there
(``d1``) on a CPU, where the per-request paths are loops; a basis that charged every
verified token like a request would, with non-negative coefficients, learn from the
batch-size slope that drafting is as dear as adding requests. SGLang's no-drafting state
is its own code path and may cost more per request than the drafting states' linear trend
says (``n1``). docs/goodput.md has the engine's measurements behind these choices.

``OnlineRoundCost`` fits the eight non-negative coefficients by exponentially forgotten
least squares on *relative* errors (each timing t weighs ``1 / t^2``, so a round of 1
request counts as much as a round of 64), regularised toward a *prior shape* scaled to
the data: before any timing it predicts the prior (relative units, a target decode step
~ 1); after timings it predicts seconds. The prior acts as pseudo-observations at fixed
design points, so the system is always well posed (directions the policy never explores
stay at the prior's shape times the learned scale) and does not wind up under
forgetting. Each ``observe`` is a rank-one update plus one batched solve on the device
(``solve_nonnegative``: the exact non-negative solution over all 256 sets of free
coefficients; ``solve_ex``, so no host synchronisation).

The catch-up term prices resuming honestly: a batch that has been off for r rounds owes
about ``bs * r`` catch-up tokens, paid by the first round that drafts again (the policy
adds them to every ``k > 0`` of that decision); on a GPU a draft extend token costs
little, on this CPU about a tenth of a decode step per 16 tokens (docs/goodput.md). The argmax of tokens per unit of
cost does not depend on the unit, so only the shape must be right early on.

A timing more than ``OUTLIER_FACTOR`` x the prediction, once ``MIN_SAMPLES`` timings were
seen, is dropped: the gap between two decode rounds then held something else (a prefill,
an idle period) and is not a round's cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

#: Coefficient names, in feature order.
ROUND_COEFS = ("d0", "d1", "v0", "v1", "e0", "e1", "n1", "c1")
#: Prior shape in units of one target decode step at batch 1 (v0 + v1 ~ 1): a draft step
#: ~ 1/8 of it, one more drafted token of a request ~ 1/20 (between a memory-bound GPU and
#: a CPU; docs/goodput.md), a small fixed speculation overhead, no extra cost of an off
#: round, and a catch-up token ~ 1/100 (a draft extend token: a draft step's weights are
#: read once for many tokens).
PRIOR_SHAPE = (0.12, 0.054, 0.95, 0.05, 0.08, 0.004, 0.0, 0.01)
#: Total weight of the prior, in rounds (the data's weight tends to 1 / (1 - memory)).
PRIOR_ROUNDS = 1.0
#: Forgetting factor per observed round.
MEMORY = 0.995
OUTLIER_FACTOR = 4.0
MIN_SAMPLES = 8
#: Design points of the prior pseudo-observations: (batch size, step count, catch-up
#: tokens); batch sizes x step counts without catch-up, plus a catch-up per batch size
#: (full rank).
_PRIOR_BS = (1.0, 4.0, 16.0)
_PRIOR_STEPS = (0.0, 1.0, 3.0, 8.0)
_PRIOR_CATCH_UP = 32.0


def round_feature_list(batch_size, batch_steps, catch_up=0.0) -> list:
    """The eight features of ``cost(bs, k, g)`` (module docstring), element-wise.

    Works on numbers, numpy arrays and torch tensors alike (operators only); the caller
    stacks them with its own library.
    """
    bs, k = batch_size, batch_steps
    spec = (k > 0) * 1.0
    return [k * 1.0, k * bs, k * 0.0 + 1.0, bs * 1.0, spec, spec * bs, (1.0 - spec) * bs,
            spec * catch_up]


def catch_up_tokens(gaps) -> int:
    """Tokens the catch-up extends before a drafting round, from each request's gap (the
    tokens its draft has not seen: 1 after its prefill, one more per off round, 0 when
    current): the gaps, plus one token of each current request once any is behind (the
    engine catches the whole batch up in one extend, a current request re-extending its
    pending bonus token); 0 when all are current. The one definition: the engine
    (``draft_kv``), the simulator and the replay count the same way."""
    gaps = [int(g) for g in gaps]
    if not any(gaps):
        return 0
    return sum(g if g else 1 for g in gaps)


def round_features(batch_size, batch_steps, catch_up=0.0) -> np.ndarray:
    """``[..., 8]`` float64 features (numpy), in ``ROUND_COEFS`` order."""
    bs = np.asarray(batch_size, dtype=np.float64)
    k = np.asarray(batch_steps, dtype=np.float64)
    g = np.broadcast_to(np.asarray(catch_up, dtype=np.float64), np.broadcast(bs, k).shape)
    return np.stack(round_feature_list(bs, k, g), axis=-1)


class RoundCost(Protocol):
    """A world model of the engine's time, as the simulator's clock and the replay use it:
    ``round(bs, k, catch_up)`` one decode round (after ``catch_up`` catch-up tokens;
    ignored when ``k = 0``), ``prefill(n)`` one request's prefill (target + draft), in
    ``unit``; non-decreasing in ``k`` (the oracle bound relies on it)."""

    name: str
    unit: str
    kind: str

    def round(self, batch_size: int, batch_steps: int, catch_up: float = 0.0) -> float: ...

    def prefill(self, num_tokens: int) -> float: ...

    def to_json(self) -> dict: ...


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """What every world model carries besides its parameters (keyword-only fields)."""

    #: Short name in tables (default: the model's ``kind``).
    name: str = ""
    unit: str = "s"
    #: Where the parameters come from.
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False)
    kind = ""

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", self.kind)

    def to_json(self) -> dict:
        """The model as JSON, tagged with its ``kind`` (``load_cost`` dispatches on it)."""
        return {**dataclasses.asdict(self), "kind": self.kind}


def _fields_of(cls, obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k in {f.name for f in dataclasses.fields(cls)}}


@dataclass(frozen=True)
class LinearRoundCost(CostModel):
    """``cost(bs, k)`` = features . coefficients (module docstring); all >= 0.
    ``prefill(n) = p0 + p1 * n``."""

    d0: float
    d1: float
    v0: float
    v1: float
    e0: float = 0.0
    e1: float = 0.0
    n1: float = 0.0
    c1: float = 0.0
    p0: float = 0.0
    p1: float = 0.0
    kind = "linear"

    def __post_init__(self):
        super().__post_init__()
        for key in ROUND_COEFS + ("p0", "p1"):
            value = getattr(self, key)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"LinearRoundCost.{key} = {value}: expected a finite value >= 0")

    @classmethod
    def from_parts(cls, *, draft_step=(0.0, 0.0), verify=(0.0, 0.0), spec=(0.0, 0.0),
                   prefill=(0.0, 0.0), catch_up: float = 0.0, **kw) -> "LinearRoundCost":
        """A world described by its physical parts, in this basis: a draft step of a batch
        ``draft_step[0] + draft_step[1] * bs``, a verify of ``bs * (k + 1)`` tokens
        ``verify[0] + verify[1] * bs * (k + 1)``, a speculative round's overhead
        ``spec[0] + spec[1] * bs``, a catch-up token ``catch_up``; every coefficient stays
        >= 0."""
        (d0, d1), (v0, v_tok), (e0, e1) = draft_step, verify, spec
        return cls(d0=d0, d1=d1 + v_tok, v0=v0, v1=v_tok, e0=e0, e1=e1, c1=catch_up,
                   p0=prefill[0], p1=prefill[1], **kw)

    def coefs(self) -> np.ndarray:
        return np.array([getattr(self, key) for key in ROUND_COEFS])

    def round(self, batch_size: int, batch_steps: int, catch_up: float = 0.0) -> float:
        return float(round_features(batch_size, batch_steps, catch_up) @ self.coefs())

    def prefill(self, num_tokens: int) -> float:
        return self.p0 + self.p1 * num_tokens

    @classmethod
    def from_json(cls, obj: dict) -> "LinearRoundCost":
        if "n1" not in obj:  # written before the one basis: a verify charged per token
            obj = dict(obj, d1=obj["d1"] + obj["v1"], n1=0.0)
        return cls(**_fields_of(cls, obj))


class OnlineRoundCost:
    """Online fit of ``cost(bs, k)`` (module docstring); all state on ``device``."""

    def __init__(self, device, *, prior_shape=PRIOR_SHAPE, prior_rounds: float = PRIOR_ROUNDS,
                 memory: float = MEMORY):
        dev = self.device = torch.device(device)
        self.memory = float(memory)
        f64 = dict(dtype=torch.float64, device=dev)
        self.prior = torch.tensor(prior_shape, **f64)
        design = torch.tensor([[b, k, 0.0] for b in _PRIOR_BS for k in _PRIOR_STEPS]
                              + [[b, 1.0, _PRIOR_CATCH_UP] for b in _PRIOR_BS], **f64)
        x0 = self._features(design[:, 0], design[:, 1], design[:, 2])
        # Relative pseudo-observations x0 . coefs = scale * c0: rows x0 / c0, target 1
        # (at scale s the rows are x0 / (s * c0): normal matrix / s^2, right side / s).
        rows = x0 / (x0 @ self.prior).unsqueeze(1)
        weight = prior_rounds / x0.shape[0]
        self._prior_gram = weight * rows.T @ rows
        self._prior_rhs = weight * rows.sum(dim=0)
        num = len(ROUND_COEFS)
        self._gram = torch.zeros(num, num, **f64)
        self._rhs = torch.zeros(num, **f64)
        #: Forgotten sums of observed seconds and of the prior's prediction for them.
        self._sum_seconds = torch.zeros((), **f64)
        self._sum_prior = torch.zeros((), **f64)
        self.num_samples = torch.zeros((), **f64)
        #: Current coefficients (``ROUND_COEFS`` order); the prior shape until data.
        self.coefs = self.prior.clone()

    @staticmethod
    def _features(batch_size: torch.Tensor, batch_steps: torch.Tensor,
                  catch_up=0.0) -> torch.Tensor:
        # A host ``catch_up`` stays a Python number (no host-to-device copy per round).
        return torch.stack(round_feature_list(batch_size, batch_steps, catch_up), dim=-1)

    def predict(self, batch_size: int, max_steps: int, catch_up: float = 0.0) -> torch.Tensor:
        """``[max_steps + 1]`` float64: predicted cost of a round of ``batch_size``
        requests for each step count ``0 .. max_steps`` (the drafting ones after
        ``catch_up`` catch-up tokens)."""
        k = torch.arange(max_steps + 1, dtype=torch.float64, device=self.device)
        return self._features(torch.full_like(k, float(batch_size)), k,
                              float(catch_up)) @ self.coefs

    def observe(self, batch_size: int, batch_steps: int, seconds: float,
                catch_up: float = 0.0) -> None:
        """One measured round (host numbers); updates the coefficients on the device."""
        f64 = dict(dtype=torch.float64, device=self.device)
        x = self._features(torch.tensor(float(batch_size), **f64),
                           torch.tensor(float(batch_steps), **f64), float(catch_up))
        t = torch.tensor(float(seconds), **f64)
        predicted = x @ self.coefs
        # Drop non-positive timings and outliers (a gap that held more than one round).
        keep = (t > 0) & ((self.num_samples < MIN_SAMPLES) | (t <= OUTLIER_FACTOR * predicted))
        w = keep.to(torch.float64)
        mem = torch.where(keep, self.memory, 1.0)
        rel = x / t.clamp_min(1e-30)
        self._gram = mem * self._gram + w * torch.outer(rel, rel)
        self._rhs = mem * self._rhs + w * rel
        self._sum_seconds = mem * self._sum_seconds + w * t
        self._sum_prior = mem * self._sum_prior + w * (x @ self.prior)
        self.num_samples = self.num_samples + w
        scale = torch.where(self._sum_prior > 0, self._sum_seconds / self._sum_prior, 1.0)
        gram = self._gram + self._prior_gram / scale ** 2
        rhs = self._rhs + self._prior_rhs / scale
        self.coefs = torch.where(torch.isfinite(rhs).all(), solve_nonnegative(gram, rhs),
                                 self.coefs)


def solve_nonnegative(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """argmin of ``c.G.c/2 - r.c`` over ``c >= 0`` (G positive definite), exactly.

    With eight coefficients every subset of free ones can be tried at once: one batched
    solve of 2^8 systems (the pinned coefficients' rows and columns replaced by the
    identity), then the feasible solution with the lowest objective wins. No host
    synchronisation, no iteration count to tune.
    """
    n = rhs.shape[0]
    subsets = torch.arange(2 ** n, device=gram.device)
    free = ((subsets.unsqueeze(1) >> torch.arange(n, device=gram.device)) & 1).to(gram.dtype)
    systems = (gram.unsqueeze(0) * free.unsqueeze(2) * free.unsqueeze(1)
               + torch.diag_embed(1.0 - free))
    solutions, _ = torch.linalg.solve_ex(systems, (rhs.unsqueeze(0) * free).unsqueeze(2))
    solutions = solutions.squeeze(2)
    objective = 0.5 * ((solutions @ gram) * solutions).sum(dim=1) - solutions @ rhs
    feasible = (solutions >= 0).all(dim=1) & torch.isfinite(objective)
    best = torch.where(feasible, objective, float("inf")).argmin()
    return solutions.index_select(0, best.reshape(1)).squeeze(0).clamp_min(0.0)
