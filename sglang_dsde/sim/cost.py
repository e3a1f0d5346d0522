"""Round cost models: how long one speculative round of a batch takes.

Contract (``RoundCost``): ``round(batch_size, batch_steps)`` is the time of one decode
round of ``batch_size`` requests drafting ``batch_steps`` tokens each (0: a plain decode
step, no draft model call), in the model's ``unit``; ``prefill(num_tokens)`` is the time
of one request's prefill (target + draft). The simulator's clock is the sum of these. The
oracle bound needs ``round`` non-decreasing in ``batch_steps`` (checked there).

``LinearRoundCost`` (the CPU model and the fitted one) is::

    round(bs, k) = k * d(bs) + v(bs, k) + [k > 0] * e(bs)
    d(bs)    = d0 + d1 * bs               # one draft decode step of the batch
    v(bs, k) = v0 + v1 * bs * (k + 1)     # the target's verify (k = 0: a decode step)
    e(bs)    = e0 + e1 * bs               # fixed cost of a speculative round (draft
                                          # extend of accepted tokens, bookkeeping)
    prefill(n) = p0 + p1 * n

``fit_linear_cost`` fits it to measured ``(batch_size, batch_steps, seconds)`` samples by
non-negative least squares (exact: the best of the feasible subset solutions; 6 unknowns).
The same routine fits the engine's round timings (bench) and the HF-forward prior
(``sim.measure``).

Presets ``ISSUE8_GPU_LIKE`` / ``ISSUE8_CPU`` are issue 8's batch-1 models in units of one
target decode step (``k * d + 1 + v1 * k``); they have no batch-size terms, so use them at
concurrency 1 only.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence, Tuple

import numpy as np

#: Coefficient names of ``LinearRoundCost.round`` in ``round_features`` order.
ROUND_COEFS = ("d0", "d1", "v0", "v1", "e0", "e1")


class RoundCost(Protocol):
    name: str
    unit: str

    def round(self, batch_size: int, batch_steps: int) -> float: ...

    def prefill(self, num_tokens: int) -> float: ...

    def to_json(self) -> dict: ...




def round_features(batch_size, batch_steps) -> np.ndarray:
    """``[..., 6]`` features whose dot product with ``ROUND_COEFS`` values is the cost.

    These describe the simulated *world* by its parts (draft step, verify of every token,
    speculation overhead). The goodput policy's online model
    (``core.round_cost.round_feature_list``) spans the same functions in another basis
    (per request and per drafted token of a request), whose non-negative cone is the
    wider one, so it can represent every world here."""
    bs = np.asarray(batch_size, dtype=np.float64)
    k = np.asarray(batch_steps, dtype=np.float64)
    spec = (k > 0).astype(np.float64)
    return np.stack([k, k * bs, np.ones_like(k), bs * (k + 1), spec, spec * bs], axis=-1)


@dataclass(frozen=True)
class LinearRoundCost:
    """The linear round cost (module docstring); all coefficients >= 0."""

    d0: float
    d1: float
    v0: float
    v1: float
    e0: float = 0.0
    e1: float = 0.0
    p0: float = 0.0
    p1: float = 0.0
    name: str = "linear"
    unit: str = "s"
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for key in ROUND_COEFS + ("p0", "p1"):
            value = getattr(self, key)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"LinearRoundCost.{key} = {value}: expected a finite value >= 0")

    def coefs(self) -> np.ndarray:
        return np.array([getattr(self, key) for key in ROUND_COEFS])

    def round(self, batch_size: int, batch_steps: int) -> float:
        return float(round_features(batch_size, batch_steps) @ self.coefs())

    def prefill(self, num_tokens: int) -> float:
        return self.p0 + self.p1 * num_tokens

    def draft_step(self, batch_size: int) -> float:
        return self.d0 + self.d1 * batch_size

    def verify(self, batch_size: int, batch_steps: int) -> float:
        return self.v0 + self.v1 * batch_size * (batch_steps + 1)

    def to_json(self) -> dict:
        out = asdict(self)
        out["kind"] = "linear"
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "LinearRoundCost":
        obj = {k: v for k, v in obj.items() if k != "kind"}
        return cls(**obj)


def fit_linear_cost(samples: Iterable[Tuple[int, int, float]],
                    prefill_samples: Iterable[Tuple[int, float]] = (), *,
                    name: str = "fitted", unit: str = "s", source: str = "",
                    with_spec_overhead: bool = True) -> LinearRoundCost:
    """Fit ``LinearRoundCost`` to ``(batch_size, batch_steps, time)`` round samples (and
    optional ``(num_tokens, time)`` prefill samples) by non-negative least squares.

    Samples should vary both batch size and steps, including ``batch_steps = 0`` (a plain
    decode step), or some coefficients are not identifiable (an unidentifiable one comes
    out 0 or absorbs its collinear partner). ``with_spec_overhead=False`` fixes e0 = e1 = 0.
    The relative RMS residual is kept in ``extra["rel_rms"]``.
    """
    data = np.array([(b, k, s) for b, k, s in samples], dtype=np.float64).reshape(-1, 3)
    if data.shape[0] == 0:
        raise ValueError("fit_linear_cost: no samples")
    if np.any(data[:, 0] < 1) or np.any(data[:, 1] < 0) or np.any(data[:, 2] < 0):
        raise ValueError("fit_linear_cost: samples need batch_size >= 1, steps >= 0, time >= 0")
    features = round_features(data[:, 0], data[:, 1])
    if not with_spec_overhead:
        features = features[:, :4]
    coefs = nnls(features, data[:, 2])
    coefs = np.concatenate([coefs, np.zeros(len(ROUND_COEFS) - coefs.shape[0])])
    pred = round_features(data[:, 0], data[:, 1]) @ coefs
    rel_rms = float(np.sqrt(np.mean(((pred - data[:, 2]) / np.maximum(data[:, 2], 1e-12)) ** 2)))
    p0 = p1 = 0.0
    pre = np.array(list(prefill_samples), dtype=np.float64).reshape(-1, 2)
    if pre.shape[0]:
        p0, p1 = nnls(np.stack([np.ones(pre.shape[0]), pre[:, 0]], axis=1), pre[:, 1])
    values = dict(zip(ROUND_COEFS, (float(c) for c in coefs)))
    return LinearRoundCost(**values, p0=float(p0), p1=float(p1), name=name, unit=unit,
                           source=source, extra={"rel_rms": rel_rms,
                                                 "num_samples": int(data.shape[0])})


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0, for few columns (exhaustive over supports)."""
    num_cols = a.shape[1]
    best, best_res = np.zeros(num_cols), float(np.sum(b ** 2))
    for size in range(1, num_cols + 1):
        for support in itertools.combinations(range(num_cols), size):
            cols = list(support)
            x_s, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x_s < 0):
                continue
            x = np.zeros(num_cols)
            x[cols] = x_s
            res = float(np.sum((a @ x - b) ** 2))
            if res < best_res - 1e-15 * max(1.0, best_res):
                best, best_res = x, res
    return best


def normalized_bs1(d: float, v1: float, name: str, source: str) -> LinearRoundCost:
    """Issue 8's batch-1 model ``k * d + 1 + v1 * k`` in target decode steps."""
    return LinearRoundCost(d0=d, d1=0.0, v0=1.0 - v1, v1=v1, name=name, unit="decode steps",
                           source=source)


ISSUE8_GPU_LIKE = normalized_bs1(0.06, 0.01, "issue8-gpu-like",
                                 "issue 8 table: GPU-like, d 0.06, v1 0.01 (batch 1 only)")
ISSUE8_CPU = normalized_bs1(0.19, 0.21, "issue8-cpu",
                            "issue 8 table: this CPU, d 0.19, v1 0.21 (batch 1 only)")


def load_cost(path) -> RoundCost:
    """A cost model from a JSON file written by ``to_json`` (linear or roofline)."""
    obj = json.loads(Path(path).read_text())
    obj = obj.get("cost", obj)
    if obj.get("kind") == "roofline":
        from .gpu_cost import RooflineRoundCost

        return RooflineRoundCost.from_json(obj)
    return LinearRoundCost.from_json(obj)


def cost_table(cost: RoundCost, batch_sizes: Sequence[int], steps: Sequence[int]) -> list:
    """Rows ``{bs, k, round, round_per_decode}`` for documentation."""
    rows = []
    for bs in batch_sizes:
        decode = cost.round(bs, 0)
        for k in steps:
            c = cost.round(bs, k)
            rows.append({"bs": bs, "k": k, "round": c, "round_per_decode": c / decode})
    return rows
