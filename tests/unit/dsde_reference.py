"""An independent plain-Python float64 reference of DSDE's exact semantics and of the replay.

Written from docs/algorithm.md ("Exact semantics", "Policy replay") one request at a time,
with Python floats and lists, sharing no code with ``sglang_dsde``. The tests compare the
batched torch policy and the replay CLI against it.

Sums that decide a tie (the warm-up mean) use Python 3.12+ ``sum()`` semantics
(Neumaier's compensated summation), spelled out in ``py_sum`` so that the result does not
depend on the Python version the tests run under.
"""

from __future__ import annotations

import math

CEIL_TOL = 1e-9


def py_sum(values) -> float:
    """``sum(values)`` as CPython >= 3.12 computes it for floats (Neumaier)."""
    total, comp = 0.0, 0.0
    for x in values:
        x = float(x)
        t = total + x
        if abs(total) >= abs(x):
            comp += (total - t) + x
        else:
            comp += (x - t) + total
        total = t
    return total + comp if comp and math.isfinite(comp) else total


def ceil_tol(x: float) -> int:
    r = round(x)
    return int(r) if abs(x - r) <= CEIL_TOL else math.ceil(x)


def wvar(xs, ws) -> float:
    sw = sum(ws)
    m = sum(w * x for w, x in zip(ws, xs)) / sw
    return sum(w * (x - m) ** 2 for w, x in zip(ws, xs)) / sw


def wvir(hist, decay) -> float:
    """``hist`` oldest first."""
    n = len(hist)
    if n < 2:
        return 0.0
    newest_first = list(reversed(hist))
    ws = [decay ** age for age in range(n)]
    s = max(1, n // 3)
    long_var = wvar(newest_first, ws)
    if long_var < 1e-6:
        return 20.0
    return wvar(newest_first[:s], ws[:s]) / long_var


class RefRequest:
    def __init__(self, initial_steps: int):
        self.k = initial_steps
        self.hist = []
        self.n_seen = 0
        self.max_acc = 0
        self.warm_kls = []
        self.bounds = None  # (k_min, k_max)


class RefDSDE:
    """Per-request DSDE over a dict of requests keyed by id."""

    def __init__(self, *, window=30, decay=0.9, alpha=2.0, min_steps=2, max_steps=10,
                 batch_cap=True, kmax_kl_weight=0.5, kmin_fraction=0.1, initial_steps=4):
        self.W, self.decay, self.alpha = window, decay, alpha
        self.min_steps, self.max_steps = min_steps, max_steps
        self.batch_cap, self.w, self.f = batch_cap, kmax_kl_weight, kmin_fraction
        self.initial_steps = initial_steps
        self.reqs = {}

    def round(self, batch):
        """``batch``: list of dicts with request, accepted, kl, temperature, done.
        Returns ``(cap or None, {request: steps})`` in batch order."""
        preds = {}
        for line in batch:
            rid = line["request"]
            r = self.reqs.setdefault(rid, RefRequest(self.initial_steps))
            kls = [float(v) for v in line["kl"]]
            acc = line["accepted"]
            r.hist = (r.hist + kls)[-self.W:]
            r.n_seen += len(kls)
            if r.n_seen < self.W:
                r.warm_kls += kls
                r.max_acc = max(r.max_acc, acc)
                if acc >= r.k:
                    r.k = min(2 * r.k, self.max_steps)
                continue
            if r.bounds is None:
                r.warm_kls += kls
                r.max_acc = max(r.max_acc, acc)
                mean_kl = py_sum(r.warm_kls) / len(r.warm_kls)
                max_kl = max(r.warm_kls)
                ratio = self.w * mean_kl / max_kl if max_kl != 0 else 0.0
                k_max = min(max(round(r.max_acc * (1 + ratio)), self.min_steps), self.max_steps)
                k_min = min(max(ceil_tol(self.f * k_max), self.min_steps), k_max)
                r.bounds = (k_min, k_max)
            k_min, k_max = r.bounds
            m_last = sum(kls) / len(kls) if kls else 0.0
            if line.get("temperature", 0.0) > 0:
                m_last = m_last / line["temperature"]
            x = wvir(r.hist, self.decay) * (math.exp(self.alpha * m_last) - 1)
            preds[rid] = max(k_min, ceil_tol((k_max - k_min) * (1 - x) + k_min)) if x <= 1 else k_min
        cap = None
        if preds and self.batch_cap:
            cap = ceil_tol(sum(preds.values()) / len(preds))
        steps = {}
        for line in batch:
            r = self.reqs[line["request"]]
            if line["request"] in preds:
                r.k = min(preds[line["request"]], cap) if cap is not None else preds[line["request"]]
            steps[line["request"]] = r.k
        for line in batch:
            if line.get("done"):
                del self.reqs[line["request"]]
        return cap, steps


def reference_replay(lines, **knobs):
    """Expected replay stdout lines for trace ``lines`` (dicts), DSDE policy."""
    ref = RefDSDE(**knobs)
    out, i = [], 0
    while i < len(lines):
        j = i
        while j < len(lines) and lines[j]["round"] == lines[i]["round"]:
            j += 1
        cap, steps = ref.round(lines[i:j])
        out.append({"round": lines[i]["round"], "cap": cap, "steps": steps})
        i = j
    return out
