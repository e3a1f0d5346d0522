"""The one round-cost protocol: features, world models, the online model, one NNLS solver.

A decode round of ``bs`` requests drafting ``k`` steps (``k = 0``: the free off, a
target-only round: no draft forward, no draft extend), in which the target verifies ``T``
drafted tokens over the batch (``T = bs * k`` when every request verifies the full window;
less with a per-request, ragged verify), after ``g`` catch-up tokens (the draft extends
each request's tokens it skipped while off, and the one it has not seen since its
prefill, before the round drafts; 0 when every request is current), costs::

    cost(bs, k, T, g) = k * d0                # draft decode steps (the batch's fixed part)
                   + k * bs * d1              # a drafted token of a request: its draft row
                                              #   and its extend row
                   + T * dv                   # a drafted token the target verifies
                   + v0 + v1 * bs             # the round itself, and each request in it
                   + [k > 0] * (e0 + e1 * bs) # fixed cost of a speculative round
                   + [k = 0] * n1 * bs        # an off round's own cost per request
                   + [k > 0] * g * c1         # the catch-up: a draft extend of g tokens

``round_feature_list`` gives the nine features; every cost model of the project speaks
this basis (``ROUND_COEFS``):

* ``LinearRoundCost``: a world model (the simulator's clock, a fit of the engine's round
  times); ``LinearRoundCost.from_parts`` builds one from physical parts (a draft step, a
  verify charged per verified token, a speculative overhead); ``sim.cost.fit_linear_cost``
  fits one to timings with the same solver;
* ``OnlineRoundCost``: what the goodput policy learns from the engine's own timings.

Why this basis: a request in the batch (``v1``: its own attention over its context, its
sampling and bookkeeping) costs far more than one more token of a request already there
(``d1 + dv``) on a CPU, where the per-request paths are loops; a basis that charged every
verified token like a request would, with non-negative coefficients, learn from the
batch-size slope that drafting is as dear as adding requests. SGLang's no-drafting state
is its own code path and may cost more per request than the drafting states' linear trend
says (``n1``). docs/goodput.md has the engine's measurements behind these choices.

``OnlineRoundCost`` fits the nine non-negative coefficients by exponentially forgotten
least squares on *relative* errors (each timing t weighs ``1 / t^2``, so a round of 1
request counts as much as a round of 64), regularised toward a *prior shape* scaled to
the data: before any timing it predicts the prior (relative units, a target decode step
~ 1); after timings it predicts seconds. The prior acts as pseudo-observations at fixed
design points, so the system is always well posed (directions the policy never explores
stay at the prior's shape times the learned scale) and does not wind up under
forgetting. Each ``observe`` is a rank-one update, and (at every one of the first
``SOLVE_ALWAYS``, then every ``SOLVE_EVERY``-th) one batched solve on the device
(``solve_nonnegative``: the exact non-negative solution over all 512 sets of free
coefficients; ``solve_ex``, so no host synchronisation). Padded rounds cannot tell ``d1``
from ``dv`` (``T = bs * k``); the prior splits them until ragged rounds teach the split.

The catch-up term prices resuming honestly: a batch that has been off for r rounds owes
about ``bs * r`` catch-up tokens, paid by the first round that drafts again (the policy
adds them to every ``k > 0`` of that decision); a draft extend token costs a fraction of a
draft step (docs/goodput.md). The argmax of tokens per unit of
cost does not depend on the unit, so only the shape must be right early on.

A timing more than ``OUTLIER_FACTOR`` x the prediction, once ``MIN_SAMPLES`` timings were
seen, is dropped: the gap between two decode rounds then held something else (a prefill,
an idle period) and is not a round's cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np
import torch

#: Coefficient names, in feature order.
ROUND_COEFS = ("d0", "d1", "dv", "v0", "v1", "e0", "e1", "n1", "c1")
#: Prior shape in units of one target decode step at batch 1 (v0 + v1 ~ 1): a draft step
#: ~ 1/8 of it, one more drafted token of a request ~ 1/20 (between a memory-bound GPU and
#: a CPU; docs/goodput.md; 60% of it its verify), a small fixed speculation overhead, no
#: extra cost of an off round, and a catch-up token ~ 1/100 (a draft extend token: a draft
#: step's weights are read once for many tokens).
PRIOR_SHAPE = (0.12, 0.022, 0.032, 0.95, 0.05, 0.08, 0.004, 0.0, 0.01)
#: Total weight of the prior, in rounds (the data's weight tends to 1 / (1 - memory)).
PRIOR_ROUNDS = 1.0
#: Forgetting factor per observed round.
MEMORY = 0.995
OUTLIER_FACTOR = 4.0
MIN_SAMPLES = 8
#: The coefficients are re-solved at every observation for the first ``SOLVE_ALWAYS``,
#: then every ``SOLVE_EVERY``-th (the sums take every one): one forgotten sample moves
#: them little, and the batched solve is most of an observation's work.
SOLVE_ALWAYS = 32
SOLVE_EVERY = 8
#: Design points of the prior pseudo-observations: batch sizes x step counts x the share
#: of the drafted tokens verified (1: a full window; 1/2: a ragged verify), plus a
#: catch-up per batch size: full rank.
_PRIOR_BS = (1.0, 4.0, 16.0)
_PRIOR_STEPS = (0.0, 1.0, 3.0, 8.0)
_PRIOR_VERIFIED = (1.0, 0.5)
_PRIOR_CATCH_UP = 32.0


def round_feature_list(batch_size, batch_steps, verified=None, catch_up=0.0) -> list:
    """The nine features of ``cost(bs, k, T, g)`` (module docstring), element-wise;
    ``verified`` (``T``) defaults to ``bs * k``, every request verifying the full window;
    ``catch_up`` (``g``) to 0.

    Works on numbers, numpy arrays and torch tensors alike (operators only); the caller
    stacks them with its own library.
    """
    bs, k = batch_size, batch_steps
    verified = k * bs if verified is None else verified
    spec = (k > 0) * 1.0
    return [k * 1.0, k * bs, verified * 1.0, k * 0.0 + 1.0, bs * 1.0, spec, spec * bs,
            (1.0 - spec) * bs, spec * catch_up]


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


def round_features(batch_size, batch_steps, verified=None, catch_up=0.0) -> np.ndarray:
    """``[..., 9]`` float64 features (numpy), in ``ROUND_COEFS`` order."""
    bs = np.asarray(batch_size, dtype=np.float64)
    k = np.asarray(batch_steps, dtype=np.float64)
    verified = None if verified is None else np.asarray(verified, dtype=np.float64)
    g = np.broadcast_to(np.asarray(catch_up, dtype=np.float64), np.broadcast(bs, k).shape)
    return np.stack(round_feature_list(bs, k, verified, g), axis=-1)


class RoundCost(Protocol):
    """A world model of the engine's time, as the simulator's clock and the replay use it:
    ``round(bs, k, verified, catch_up)`` one decode round (``verified``: drafted tokens
    the target verifies over the batch, default ``bs * k``; ``catch_up``: catch-up tokens
    extended first, ignored when ``k = 0``), ``prefill(n)`` one request's prefill (target +
    draft), in ``unit``; non-decreasing in ``k`` and in ``verified`` (the oracle bound
    relies on it)."""

    name: str
    unit: str
    kind: str

    def round(self, batch_size: int, batch_steps: int, verified: Optional[int] = None,
              catch_up: float = 0.0) -> float: ...

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
    dv: float = 0.0
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
        ``draft_step[0] + draft_step[1] * bs``, a verify of ``bs + T`` tokens (the bonus
        token of each request and ``T`` drafted ones) ``verify[0] + verify[1] * (bs + T)``,
        a speculative round's overhead ``spec[0] + spec[1] * bs``, a catch-up token
        ``catch_up``; all >= 0."""
        (d0, d1), (v0, v_tok), (e0, e1) = draft_step, verify, spec
        return cls(d0=d0, d1=d1, dv=v_tok, v0=v0, v1=v_tok, e0=e0, e1=e1, c1=catch_up,
                   p0=prefill[0], p1=prefill[1], **kw)

    def coefs(self) -> np.ndarray:
        return np.array([getattr(self, key) for key in ROUND_COEFS])

    def round(self, batch_size: int, batch_steps: int, verified: Optional[int] = None,
              catch_up: float = 0.0) -> float:
        return float(round_features(batch_size, batch_steps, verified, catch_up)
                     @ self.coefs())

    def prefill(self, num_tokens: int) -> float:
        return self.p0 + self.p1 * num_tokens

    @classmethod
    def from_json(cls, obj: dict) -> "LinearRoundCost":
        if "n1" not in obj:  # written before the one basis: a verify charged per token
            obj = dict(obj, dv=obj["v1"], n1=0.0)
        return cls(**_fields_of(cls, obj))


class OnlineRoundCost:
    """Online fit of ``cost(bs, k)`` (module docstring); all state on ``device``."""

    def __init__(self, device, *, prior_shape=PRIOR_SHAPE, prior_rounds: float = PRIOR_ROUNDS,
                 memory: float = MEMORY):
        dev = self.device = torch.device(device)
        self.memory = float(memory)
        f64 = dict(dtype=torch.float64, device=dev)
        self.prior = torch.tensor(prior_shape, **f64)
        design = torch.tensor([[b, k, b * k * v, 0.0] for b in _PRIOR_BS for k in _PRIOR_STEPS
                               for v in _PRIOR_VERIFIED]
                              + [[b, 1.0, b, _PRIOR_CATCH_UP] for b in _PRIOR_BS], **f64)
        x0 = self._features(design[:, 0], design[:, 1], design[:, 2], design[:, 3])
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
        #: Observations so far (host int, the same on every TP rank): when to solve.
        self.num_observed = 0
        #: Current coefficients (``ROUND_COEFS`` order); the prior shape until data.
        self.coefs = self.prior.clone()

    @staticmethod
    def _features(batch_size: torch.Tensor, batch_steps: torch.Tensor,
                  verified: Optional[torch.Tensor] = None, catch_up=0.0) -> torch.Tensor:
        return torch.stack(round_feature_list(batch_size, batch_steps, verified, catch_up),
                           dim=-1)

    def predict(self, batch_size: int, max_steps: int, *, unverified: bool = False,
                catch_up: float = 0.0) -> torch.Tensor:
        """``[max_steps + 1]`` float64: predicted cost of a round of ``batch_size``
        requests for each step count ``0 .. max_steps``, every request verifying the full
        window (``unverified``: none of the drafted tokens verified; add
        ``per_verified_token`` for each one that is), the drafting ones after ``catch_up``
        catch-up tokens (a host number stays a Python scalar: no host-to-device copy)."""
        k = torch.arange(max_steps + 1, dtype=torch.float64, device=self.device)
        verified = torch.zeros_like(k) if unverified else None
        return self._features(torch.full_like(k, float(batch_size)), k, verified,
                              float(catch_up)) @ self.coefs

    @property
    def per_verified_token(self) -> torch.Tensor:
        """0-dim: the predicted cost of one more drafted token verified (``dv``)."""
        return self.coefs[ROUND_COEFS.index("dv")]

    def observe(self, sample: torch.Tensor) -> None:
        """One measured round: ``sample`` = ``[batch size, steps, seconds, verified,
        catch-up]`` float64 on this model's device (``verified``: drafted tokens the target
        verified; ``catch-up``: tokens the round's catch-up extended; ``round_sample``
        builds one from host numbers). A tensor, not host numbers, so the engine can stage
        it without a host sync and share one rank's timing with the others
        (``DSDERuntime``)."""
        sample = sample.to(dtype=torch.float64)
        x = self._features(sample[0], sample[1], sample[3], sample[4])
        t = sample[2]
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
        self.num_observed += 1
        if self.num_observed > SOLVE_ALWAYS and self.num_observed % SOLVE_EVERY:
            return
        self.solve()

    def solve(self) -> None:
        """Re-solve the coefficients from the sums (``observe`` calls it)."""
        scale = torch.where(self._sum_prior > 0, self._sum_seconds / self._sum_prior, 1.0)
        gram = self._gram + self._prior_gram / scale ** 2
        rhs = self._rhs + self._prior_rhs / scale
        self.coefs = torch.where(torch.isfinite(rhs).all(), solve_nonnegative(gram, rhs),
                                 self.coefs)


#: Length of a cost sample: ``[batch size, steps, seconds, verified, catch-up]``.
ROUND_SAMPLE_SIZE = 5


def round_sample_values(batch_size: int, batch_steps: int, seconds: float,
                        verified: Optional[int] = None, catch_up: float = 0.0) -> list:
    """The five host numbers of a cost sample (``verified`` default: ``bs * steps``)."""
    verified = batch_size * batch_steps if verified is None else verified
    return [float(batch_size), float(batch_steps), float(seconds), float(verified),
            float(catch_up)]


def round_sample(batch_size: int, batch_steps: int, seconds: float,
                 verified: Optional[int] = None, catch_up: float = 0.0,
                 device="cpu") -> torch.Tensor:
    """``[batch size, steps, seconds, verified, catch-up]`` float64: one round's cost
    sample built from host numbers (the simulator, the replay; on a CUDA device this is a
    host-to-device copy, which the engine's runtime avoids by staging)."""
    return torch.tensor(round_sample_values(batch_size, batch_steps, seconds, verified,
                                            catch_up), dtype=torch.float64, device=device)


def solve_nonnegative(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """argmin of ``c.G.c/2 - r.c`` over ``c >= 0`` (G positive definite), exactly.

    With nine coefficients every subset of free ones can be tried at once: one batched
    solve of 2^9 systems (the pinned coefficients' rows and columns replaced by the
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
