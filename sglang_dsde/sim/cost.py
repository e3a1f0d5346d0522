"""The simulator's world models, by name: presets, JSON files and the roofline models.

Every model follows the core's one round-cost protocol (``core.round_cost``: the feature
basis, ``RoundCost``, ``LinearRoundCost``, ``solve_nonnegative``); this module names
them and fits ``LinearRoundCost`` to timings (``fit_linear_cost``, ``nnls``: the core's
solver on the normal equations). ``cost_from_spec(spec, context=...)`` understands:

* ``file:PATH`` (or ``cpu:PATH``, or a path ending in ``.json``): a cost written by
  ``to_json`` (a fitted ``LinearRoundCost``, e.g. the CPU prior of
  ``bench/record_traces.py --measure-cost`` or the engine fit of ``bench/compare.py``);
* ``bs1-gpu-like``, ``bs1-cpu``: batch-1 models in units of one target decode step
  (``k * d + 1 + v1 * k``; no batch-size terms, so concurrency 1 only);
* ``h100-llama3-8b``, ``h100x4-llama3-70b``: the roofline models (``gpu_cost``), at a
  context of ``context`` tokens per request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Tuple

import numpy as np
import torch

from ..core.round_cost import (ROUND_COEFS, LinearRoundCost, RoundCost, round_features,
                               solve_nonnegative)
from .gpu_cost import GPU_PRESETS, RooflineRoundCost, gpu_preset


def bs1_model(draft_step: float, verify_per_token: float, name: str,
              source: str) -> LinearRoundCost:
    """``k * d + 1 + v1 * k`` in target decode steps (batch 1 only)."""
    return LinearRoundCost.from_parts(draft_step=(draft_step, 0.0),
                                      verify=(1.0 - verify_per_token, verify_per_token),
                                      name=name, unit="decode steps", source=source)


BS1_GPU_LIKE = bs1_model(0.06, 0.01, "bs1-gpu-like",
                         "batch-1 GPU-like shape: draft step 0.06, verify token 0.01")
BS1_CPU = bs1_model(0.19, 0.21, "bs1-cpu",
                    "batch-1 shape of this CPU: draft step 0.19, verify token 0.21")
#: Presets that have no batch-size terms (the simulator runs them at concurrency 1 only).
BATCH1_PRESETS = {c.name: c for c in (BS1_GPU_LIKE, BS1_CPU)}
_KINDS = {cls.kind: cls for cls in (LinearRoundCost, RooflineRoundCost)}


def load_cost(path) -> RoundCost:
    """A cost model from a JSON file written by ``to_json`` (or ``{"cost": ...}``)."""
    obj = json.loads(Path(path).read_text())
    obj = obj.get("cost", obj)
    return _KINDS[obj.get("kind", "linear")].from_json(obj)


def default_context(requests) -> float:
    """The roofline models' context per request for a workload: its mean prompt plus half
    its output (the mean context over a request's decode)."""
    return float(np.mean([r.prompt_len + r.num_tokens / 2 for r in requests]))


def cost_from_spec(spec: str, *, context: float = 1024.0) -> RoundCost:
    """The world model ``spec`` names (module docstring); ``ValueError`` when unknown."""
    for prefix in ("file:", "cpu:"):
        if spec.startswith(prefix):
            return load_cost(spec[len(prefix):])
    if spec.endswith(".json"):
        return load_cost(spec)
    if spec in BATCH1_PRESETS:
        return BATCH1_PRESETS[spec]
    if spec in GPU_PRESETS:
        return gpu_preset(spec, context=context)
    raise ValueError(f"unknown cost spec {spec!r}: expected file:PATH, "
                     f"{', '.join(BATCH1_PRESETS)} or {', '.join(GPU_PRESETS)}")


def fit_linear_cost(samples: Iterable[Tuple], prefill_samples: Iterable[Tuple[int, float]] = (),
                    *, name: str = "fitted", unit: str = "s", source: str = "") -> LinearRoundCost:
    """Fit ``LinearRoundCost`` to round samples ``(batch_size, batch_steps, time[,
    verified[, catch_up]])`` (and optional ``(num_tokens, time)`` prefill samples) by
    non-negative least squares (``c1`` stays 0 without catch-up samples).

    Samples should vary both batch size and steps, including ``batch_steps = 0``, or some
    coefficients are not identifiable (an unidentifiable one comes out 0 or absorbs its
    collinear partner). The basis has one redundant direction (``bs = [k > 0] bs +
    [k = 0] bs``: ``v1``, ``e1`` and ``n1`` are known only through ``v1 + e1`` and ``v1 +
    n1``): the fit pins ``e1`` or ``n1`` at 0, whichever fits better (``n1`` on a tie).
    Without a sample whose ``verified`` differs from ``bs * k``, ``d1`` and ``dv`` cannot
    be told apart either: ``dv`` is pinned at 0 (a ragged verify saves nothing in that
    model: the conservative reading). The relative RMS residual is in ``extra["rel_rms"]``.
    """
    rows = [tuple(x) + (None,) * (5 - len(x)) for x in samples]
    data = np.array([(b, k, t, b * k if v is None else v, g or 0.0) for b, k, t, v, g in rows],
                    dtype=np.float64).reshape(-1, 5)
    if data.shape[0] == 0:
        raise ValueError("fit_linear_cost: no samples")
    if np.any(data[:, 0] < 1) or np.any(data[:, 1] < 0) or np.any(data[:, 2] < 0):
        raise ValueError("fit_linear_cost: samples need batch_size >= 1, steps >= 0, time >= 0")
    features = round_features(data[:, 0], data[:, 1], data[:, 3], data[:, 4])
    padded_only = bool(np.all(data[:, 3] == data[:, 0] * data[:, 1]))
    fits = []
    for pinned in ("n1", "e1"):
        pins = {pinned, "dv"} if padded_only else {pinned}
        keep = [i for i, c in enumerate(ROUND_COEFS) if c not in pins]
        coefs = np.zeros(len(ROUND_COEFS))
        coefs[keep] = nnls(features[:, keep], data[:, 2])
        fits.append((float(np.sum((features @ coefs - data[:, 2]) ** 2)), coefs))
    coefs = fits[1][1] if fits[1][0] < fits[0][0] * (1 - 1e-9) else fits[0][1]
    pred = features @ coefs
    rel_rms = float(np.sqrt(np.mean(((pred - data[:, 2]) / np.maximum(data[:, 2], 1e-12)) ** 2)))
    p0 = p1 = 0.0
    pre = np.array(list(prefill_samples), dtype=np.float64).reshape(-1, 2)
    if pre.shape[0]:
        p0, p1 = nnls(np.stack([np.ones(pre.shape[0]), pre[:, 0]], axis=1), pre[:, 1])
    values = dict(zip(ROUND_COEFS, (float(c) for c in coefs)))
    return LinearRoundCost(**values, p0=float(p0), p1=float(p1), name=name, unit=unit,
                           source=source, extra={"rel_rms": rel_rms,
                                                 "num_samples": int(data.shape[0])})


def nnls(a, b) -> np.ndarray:
    """argmin ``||a x - b||`` subject to ``x >= 0`` (few columns; ``solve_nonnegative`` on
    the normal equations, with a ridge of 1e-15 of their scale so that an unidentifiable
    direction comes out 0 instead of undefined)."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    gram = a.T @ a
    ridge = 1e-15 * torch.clamp(gram.diagonal().max(), min=1e-300)
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    return solve_nonnegative(gram, a.T @ b).numpy()
