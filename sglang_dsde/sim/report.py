"""Result rows and their markdown/JSON tables (shared by the simulator and the bench).

A *cell* is one (trace, cost model, concurrency) setting; a *row* is one contender in a
cell. ``result_row`` / ``oracle_row`` make rows, ``add_ratios`` fills the per-cell ratios:

* ``speedup``: throughput / throughput of ``static:0`` (no speculation) in the cell;
* ``vs_static_opt``: throughput / the best static SL's throughput in the cell
  (``best_static``: no speculation counts as static 0);
* ``oracle_frac``: throughput / the oracle bound's throughput in the cell.

``add_single_static`` adds ``vs_static_global``: throughput / that of the one static SL
that is best over a group of cells (``best_single_static``: the largest geometric mean
of ``vs_static_opt`` over the group), what one profiled length gets everywhere.

``accept_length`` is tokens produced by decode rounds per request-round (bonus token
included): what SGLang reports as the average accept length. Times are in the cost
model's unit (``unit`` column). ``write_tables`` writes ``STEM.md`` and ``STEM.json``.
No plotting here (matplotlib lives in bench/).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .oracle import OracleResult
from .simulator import SimResult

NO_SPEC = "static:0"
ORACLE = "oracle"

#: Default markdown columns (key, header, format).
COLUMNS = (("contender", "contender", "{}"), ("accept_length", "accept len", "{:.2f}"),
           ("mean_steps", "mean SL", "{:.2f}"), ("throughput", "tok/unit", "{:.4g}"),
           ("latency_mean", "lat mean", "{:.4g}"), ("latency_p99", "lat p99", "{:.4g}"),
           ("tpot_mean", "TPOT", "{:.4g}"), ("speedup", "x no-spec", "{:.3f}"),
           ("vs_static_opt", "x static-opt", "{:.3f}"), ("oracle_frac", "x oracle", "{:.3f}"))


def _pct(values: Sequence[float], q: float) -> Optional[float]:
    return float(np.percentile(values, q)) if len(values) else None


def result_row(res: SimResult, **cell) -> dict:
    """A row for one simulated contender (``cell`` keys are copied in)."""
    lat = [r.latency for r in res.requests]
    tpot = [r.tpot for r in res.requests if r.tpot is not None]
    req_rounds = sum(r.num_rounds for r in res.requests)
    round_tokens = int(res.round_tokens.sum())
    return {**cell, "contender": res.name, "num_requests": len(res.requests),
            "num_tokens": res.num_tokens, "num_rounds": int(res.round_bs.shape[0]),
            "accept_length": round_tokens / req_rounds if req_rounds else None,
            "mean_steps": float(res.round_steps.mean()) if res.round_steps.size else 0.0,
            "mean_bs": float(res.round_bs.mean()) if res.round_bs.size else 0.0,
            "makespan": res.makespan, "throughput": res.num_tokens / res.makespan,
            "latency_mean": float(np.mean(lat)), "latency_p50": _pct(lat, 50),
            "latency_p99": _pct(lat, 99),
            "ttft_mean": float(np.mean([r.ttft for r in res.requests])),
            "tpot_mean": float(np.mean(tpot)) if tpot else None}


def oracle_row(o: OracleResult, requests, **cell) -> dict:
    """A row for the oracle bound (latencies only at concurrency 1)."""
    rounds = o.num_request_rounds
    decode_tokens = sum(max(r.num_tokens - 1, 0) for r in requests)
    steps = [k for plan in o.req_plans for k in plan]
    lat = o.latencies
    tpot = None
    if lat is not None:
        tpot = [t / (r.num_tokens - 1) for t, r in zip(o.req_round_time, requests)
                if r.num_tokens > 1]
    return {**cell, "contender": ORACLE, "num_requests": len(requests),
            "num_tokens": o.num_tokens, "num_rounds": rounds,
            "accept_length": decode_tokens / rounds if rounds else None,
            "mean_steps": float(np.mean(steps)) if steps else 0.0, "mean_bs": None,
            "makespan": o.makespan, "throughput": o.throughput,
            "latency_mean": float(np.mean(lat)) if lat else None,
            "latency_p50": _pct(lat, 50) if lat else None,
            "latency_p99": _pct(lat, 99) if lat else None, "ttft_mean": None,
            "tpot_mean": float(np.mean(tpot)) if tpot else None}


def _cell_key(row: dict, cell_keys: Sequence[str]) -> tuple:
    return tuple(row.get(k) for k in cell_keys)


def is_static(row: dict) -> bool:
    return str(row["contender"]).startswith("static:")


def best_static(members: Sequence[dict]) -> Optional[dict]:
    """The row of the best static SL of one cell (``static:0``, no speculation, counts):
    the one definition of "best static" (ties: the first)."""
    statics = [r for r in members if is_static(r)]
    return max(statics, key=lambda r: r["throughput"]) if statics else None


def _group(rows: Iterable[dict], keys: Sequence[str]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault(_cell_key(row, keys), []).append(row)
    return groups


def add_ratios(rows: List[dict], cell_keys: Sequence[str] = ("trace", "cost", "concurrency")
               ) -> List[dict]:
    """Fill ``speedup``, ``vs_static_opt``, ``static_opt``, ``oracle_frac`` in place."""
    for members in _group(rows, cell_keys).values():
        by_name = {r["contender"]: r for r in members}
        best = best_static(members)
        base = by_name.get(NO_SPEC)
        oracle = by_name.get(ORACLE)
        for r in members:
            r["speedup"] = r["throughput"] / base["throughput"] if base else None
            r["vs_static_opt"] = r["throughput"] / best["throughput"] if best else None
            r["static_opt"] = best["contender"] if best else None
            r["oracle_frac"] = r["throughput"] / oracle["throughput"] if oracle else None
    return rows


def best_single_static(rows: Sequence[dict], cell_keys: Sequence[str]) -> Optional[str]:
    """The static SL with the largest geometric mean of ``vs_static_opt`` over the cells
    of ``rows`` (``add_ratios`` first); only SLs present in every cell compete."""
    cells = _group(rows, cell_keys)
    names = sorted({r["contender"] for r in rows if is_static(r)})
    best, best_score = None, -math.inf
    for name in names:
        ratios = [r["vs_static_opt"] for members in cells.values() for r in members
                  if r["contender"] == name]
        if len(ratios) != len(cells) or min(ratios) <= 0:
            continue
        score = sum(math.log(x) for x in ratios) / len(ratios)
        if score > best_score:
            best, best_score = name, score
    return best


def add_single_static(rows: List[dict], cell_keys: Sequence[str],
                      across: Sequence[str]) -> List[dict]:
    """Fill ``static_global`` / ``vs_static_global`` in place: per group of cells that
    differ only in ``across``, the ``best_single_static`` of the group."""
    rest = [k for k in cell_keys if k not in across]
    for members in _group(rows, rest).values():
        best = best_single_static(members, cell_keys)
        by = {(_cell_key(r, cell_keys), r["contender"]): r for r in members}
        for r in members:
            ref = by.get((_cell_key(r, cell_keys), best)) if best else None
            r["static_global"] = best
            r["vs_static_global"] = r["throughput"] / ref["throughput"] if ref else None
    return rows


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def markdown_table(rows: Iterable[dict], columns=COLUMNS) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def write_tables(rows: List[dict], stem, *, title: str, notes: Sequence[str] = (),
                 meta: Optional[dict] = None,
                 cell_keys: Sequence[str] = ("trace", "cost", "concurrency"),
                 columns=COLUMNS) -> Path:
    """``STEM.md`` (one table per cell) and ``STEM.json`` (all rows + ``meta``)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    seen: Dict[tuple, List[dict]] = {}
    for row in rows:
        seen.setdefault(_cell_key(row, cell_keys), []).append(row)
    for key, members in seen.items():
        heading = ", ".join(f"{k} {v}" for k, v in zip(cell_keys, key))
        unit = members[0].get("unit")
        best = members[0].get("static_opt")
        lines += [f"## {heading}", "",
                  f"unit: {unit}; static-opt: {best}", "", markdown_table(members, columns), ""]
    lines += [f"- {n}" for n in notes]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta or {}, "rows": rows},
                                                    indent=1, default=_json_default) + "\n")
    return stem.with_suffix(".md")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
