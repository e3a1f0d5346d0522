"""Plots of result rows (``sglang_dsde.sim.report`` rows) and simulated schedules.

Shared by bench/simulate.py and the engine bench: the functions take rows (dicts with
``contender``, ``throughput``, ``vs_static_opt``, ``latency_mean``, ``latency_p99`` and
the cell keys) or per-round step logs, and write small PNGs (matplotlib, Agg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 80


def _cells(rows: Sequence[dict], cell_keys: Sequence[str]) -> Dict[tuple, List[dict]]:
    cells: Dict[tuple, List[dict]] = {}
    for r in rows:
        cells.setdefault(tuple(r.get(k) for k in cell_keys), []).append(r)
    return cells


def _label(key: tuple) -> str:
    return "\n".join(str(k) for k in key)


def plot_ratio_bars(rows: Sequence[dict], path, *, value: str = "vs_static_opt",
                    contenders: Sequence[str], cell_keys=("trace", "cost", "concurrency"),
                    title: str = "throughput / best static SL") -> Path:
    """Grouped bars, one panel per value of the first cell key (e.g. per trace): one
    group per remaining cell, one bar per contender; a line at 1."""
    panels: Dict[object, Dict[tuple, List[dict]]] = {}
    for key, members in _cells(rows, cell_keys).items():
        panels.setdefault(key[0], {})[key[1:]] = members
    width = 0.8 / max(1, len(contenders))
    most = max(len(c) for c in panels.values())
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.3 * most), 3.2 * len(panels)),
                             squeeze=False)
    for ax, (panel, cells) in zip(axes[:, 0], panels.items()):
        x = np.arange(len(cells))
        for i, name in enumerate(contenders):
            ys = [next((r[value] for r in members if r["contender"] == name), None)
                  for members in cells.values()]
            ax.bar(x + (i - (len(contenders) - 1) / 2) * width,
                   [np.nan if y is None else y for y in ys], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [_label(k) for k in cells], fontsize=7)
        ax.set_ylabel(value, fontsize=8)
        ax.set_title(f"{title}: {panel}", fontsize=9)
        ax.legend(fontsize=6, ncol=min(6, len(contenders)), loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def plot_latency(rows: Sequence[dict], path, *, contenders: Sequence[str],
                 cell_keys=("trace", "cost", "concurrency")) -> Path:
    """Mean (bar) and p99 (marker) request latency per contender, one panel per cell,
    normalised by no speculation's mean latency in the cell."""
    cells = _cells(rows, cell_keys)
    ncols = min(4, len(cells))
    nrows = -(-len(cells) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    for ax, (key, members) in zip(axes.flat, cells.items()):
        by = {r["contender"]: r for r in members}
        base = by.get("static:0", {}).get("latency_mean") or 1.0
        names = [c for c in contenders if c in by and by[c].get("latency_mean") is not None]
        means = [by[c]["latency_mean"] / base for c in names]
        p99 = [by[c]["latency_p99"] / base for c in names]
        ax.bar(range(len(names)), means)
        ax.plot(range(len(names)), p99, "k_", markersize=10)
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=6)
        ax.set_title(_label(key).replace("\n", " "), fontsize=7)
        ax.set_ylabel("latency / no-spec mean", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def plot_steps_over_time(step_logs: Dict[str, List[Dict[str, int]]], path, *,
                         max_requests: int = 4, title: str = "") -> Path:
    """Per-request drafted SL over rounds (one panel per contender) for the first
    ``max_requests`` requests of each log; the batch's step count in grey."""
    fig, axes = plt.subplots(len(step_logs), 1, figsize=(8, 1.9 * len(step_logs)),
                             squeeze=False, sharex=True)
    for ax, (name, log) in zip(axes[:, 0], step_logs.items()):
        ids: List[str] = []
        for entry in log:
            ids += [i for i in entry if i not in ids]
        ax.plot([max(e.values()) for e in log], color="0.7", linewidth=2, label="batch")
        for rid in ids[:max_requests]:
            xs = [i for i, e in enumerate(log) if rid in e]
            ax.step(xs, [log[i][rid] for i in xs], where="post", linewidth=1, label=rid)
        ax.set_ylabel(name, fontsize=7)
        ax.legend(fontsize=5, loc="upper right", ncol=5)
    axes[-1, 0].set_xlabel("round")
    if title:
        axes[0, 0].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)
