"""Simulate every contender over recorded traces, cost models and concurrencies.

    python bench/simulate.py [TRACE.jsonl ...] [--cost SPEC ...] [--concurrency 1 8]
        [--contenders "dsde;dsde+cut;..."] [--seed 0] [--out bench/results/sim]
        [--synthetic] [--plots/--no-plots]

* Traces: the given files, else every ``bench/results/traces/*.jsonl``
  (``bench/record_traces.py``); ``--synthetic`` adds a seeded i.i.d. trace (60%
  agreement, constant KL levels) for a quick look without models.
* Cost specs (``sglang_dsde.sim.cost.cost_from_spec``): ``cpu:FILE`` / ``file:FILE`` (a
  fitted ``LinearRoundCost`` JSON: the CPU prior written by ``record_traces.py
  --measure-cost``, or the engine's fit), ``bs1-gpu-like`` / ``bs1-cpu`` (batch-1
  presets; only run at concurrency 1), ``h100-llama3-8b`` / ``h100x4-llama3-70b``
  (roofline, context = the trace's mean prompt + half its output). Default: every
  ``bench/results/sim/cpu_prior_*.json`` plus both H100 presets.
* Contenders: ``static:0 .. static:K`` (K = the trace's max_steps) always, then the
  ``--contenders`` list (default: the comparison's policy list,
  ``sim.contenders.POLICY_CONTENDERS``: each per-request policy ragged and padded, and
  the two hindsight schedules); the oracle bound is added to every cell.
* ``--seed`` shuffles the arrival order of each trace's requests (0: file order).

Writes ``OUT/sim.md`` and ``OUT/sim.json`` (every row; ``sglang_dsde.sim.report``),
``OUT/summary.md`` (one line per cell: static-opt and each contender's ratio to it), and
plots ``OUT/ratio_static_opt.png``, ``OUT/latency.png``, ``OUT/sl_over_time.png``.
Deterministic; progress on stderr.
"""

from __future__ import annotations

import argparse
import glob
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from sglang_dsde.sim import (GPU_PRESETS, cost_from_spec, parse_contenders,  # noqa: E402
                             read_trace, run_cell, synthetic_trace)
from sglang_dsde.sim.contenders import HINDSIGHT, POLICY_CONTENDERS, static_contenders  # noqa: E402
from sglang_dsde.sim.cost import BATCH1_PRESETS, default_context  # noqa: E402
from sglang_dsde.sim.report import best_single_static, write_tables  # noqa: E402
from sglang_dsde.trace import trace_summary  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_CONTENDERS = ";".join(POLICY_CONTENDERS + tuple(HINDSIGHT))


def trace_name(path: Path, header: dict) -> str:
    return f"{header.get('workload')}/{header.get('draft')}" if path else "synthetic"


def build_costs(specs, trace):
    """(name, cost) pairs for one trace (the roofline context depends on the trace)."""
    ctx = default_context(trace.requests)
    out = []
    for spec in specs:
        try:
            cost = cost_from_spec(spec, context=ctx)
        except ValueError as exc:
            sys.exit(f"simulate: {exc}")
        out.append((cost.name if spec.startswith(("cpu:", "file:")) else spec, cost))
    return out


def summary_lines(rows, contenders):
    """One line per cell (ratios to static-opt), then per contender its worst and mean
    ratio to static-opt, the best single static SL and the oracle over all cells."""
    cells = {}
    for r in rows:
        cells.setdefault((r["trace"], r["cost"], r["concurrency"]), []).append(r)
    sl_of = [c for c in ("goodput", "dsde") if c in contenders]
    head = ["trace", "cost", "C", "static-opt (x no-spec)", "oracle"] + contenders + [
        f"{c} mean SL" for c in sl_of]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (trace, cost, conc), members in cells.items():
        by = {r["contender"]: r for r in members}
        best = by[members[0]["static_opt"]]
        cols = [trace, cost, str(conc), f"k={best['contender'][7:]}: {best['speedup']:.2f}x",
                f"{by['oracle']['vs_static_opt']:.3f}"]
        cols += [f"{by[c]['vs_static_opt']:.3f}" if c in by else "-" for c in contenders]
        cols += [f"{by[c]['mean_steps']:.1f}" if c in by else "-" for c in sl_of]
        lines.append("| " + " | ".join(cols) + " |")
    # The best single static SL over all cells: what one profiled length gets everywhere.
    global_static = best_single_static(rows, ("trace", "cost", "concurrency"))
    lines += ["", "| contender | worst x static-opt | mean x static-opt | mean x "
              f"{global_static} (best single static) | mean x oracle |", "|---|---|---|---|---|"]
    for c in contenders + [global_static]:
        mine = [r for r in rows if r["contender"] == c]
        if not mine:
            continue
        ratio = [r["vs_static_opt"] for r in mine]
        vs_global = [r["throughput"] / next(
            g["throughput"] for g in cells[(r["trace"], r["cost"], r["concurrency"])]
            if g["contender"] == global_static) for r in mine]
        frac = [r["oracle_frac"] for r in mine if r["oracle_frac"] is not None]
        lines.append(f"| {c} | {min(ratio):.3f} | {np.mean(ratio):.3f} | "
                     f"{np.mean(vs_global):.3f} | {np.mean(frac):.3f} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="*")
    p.add_argument("--cost", action="append", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "sim"))
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    out = Path(args.out)
    paths = [Path(p) for p in
             (args.traces or sorted(glob.glob(str(RESULTS / "traces" / "*.jsonl"))))]
    traces = [(trace_name(p, t.header), t) for p in paths for t in [read_trace(p)]]
    if args.synthetic or not traces:
        traces.append(("synthetic", synthetic_trace(16, 64, 8, 0.6, seed=args.seed)))
    priors = sorted(glob.glob(str(out / "cpu_prior_*.json")))
    cost_specs = args.cost or ([f"cpu:{f}" for f in priors] + list(GPU_PRESETS))
    extra = parse_contenders(args.contenders)
    rows, step_logs, notes = [], {}, []
    t0 = time.time()
    for name, trace in traces:
        requests = list(trace.requests)
        if args.seed:
            random.Random(args.seed).shuffle(requests)
        summ = trace_summary(trace)
        notes.append(f"trace {name}: {summ['num_requests']} requests, {summ['num_tokens']} "
                     f"tokens, agreement {summ['agreement']:.3f}, mean accept run "
                     f"{summ['mean_accept']:.2f}, max_steps {trace.max_steps}, target "
                     f"{trace.header.get('target')}, draft {trace.header.get('draft')}, "
                     f"verify_disagree {summ['verify_disagree']}, run_violations "
                     f"{summ['run_violations']}")
        contenders = static_contenders(trace.max_steps) + extra
        for cost_name, cost in build_costs(cost_specs, trace):
            for conc in args.concurrency:
                if cost_name in BATCH1_PRESETS and conc != 1:
                    continue
                cell = {"trace": name, "cost": cost_name}
                bar = tqdm(total=len(contenders), desc=f"{name} {cost_name} C={conc}",
                           leave=False, file=sys.stderr)
                cell_rows, results = run_cell(requests, contenders, cost, concurrency=conc,
                                              max_steps=trace.max_steps, cell=cell,
                                              log_steps=True, progress=lambda _: bar.update())
                bar.close()
                rows += cell_rows
                best = next(r["static_opt"] for r in cell_rows)
                key = f"{name} {cost_name} C={conc}"
                step_logs[key] = {c: results[c].round_req_steps for c in ("dsde", best)
                                  if c in results}
                print(f"{key}: static-opt {best}, " + ", ".join(
                    f"{r['contender']} {r['vs_static_opt']:.3f}" for r in cell_rows
                    if not r["contender"].startswith("static:")), file=sys.stderr, flush=True)
        for cost_name, cost in build_costs(cost_specs, trace):
            notes.append(f"cost {cost_name} ({name}): {cost.source}; unit {cost.unit}")
    notes.append(f"simulated in {time.time() - t0:.0f} s; arrival seed {args.seed}; "
                 "oracle = throughput upper bound (exact at C = 1), see docs/simulator.md")
    labels = [c.label for c in extra]
    meta = {"traces": [str(p) for p in paths], "costs": cost_specs,
            "concurrency": args.concurrency, "contenders": labels, "seed": args.seed}
    md = write_tables(rows, out / "sim", title="Simulated contenders (bench/simulate.py)",
                      notes=notes, meta=meta)
    (out / "summary.md").write_text("\n".join(
        ["# Simulation summary: throughput / best static SL (static-opt)", ""]
        + summary_lines(rows, labels) + [""] + [f"- {n}" for n in notes]) + "\n")
    if args.plots:
        from bench.plots import plot_latency, plot_ratio_bars, plot_steps_over_time

        plot_ratio_bars(rows, out / "ratio_static_opt.png", contenders=["oracle"] + labels)
        plot_latency(rows, out / "latency.png",
                     contenders=["static:0"] + [r for r in dict.fromkeys(
                         r["static_opt"] for r in rows)] + labels)
        # The batched cell where speculation pays most (largest static-opt speedup).
        best_cell = max((r for r in rows if r["contender"] == r["static_opt"]),
                        key=lambda r: (r["concurrency"] > 1, r["speedup"]))
        key = f"{best_cell['trace']} {best_cell['cost']} C={best_cell['concurrency']}"
        plot_steps_over_time(step_logs[key], out / "sl_over_time.png", title=key)
    print(f"simulate: wrote {md}, {out / 'summary.md'}" + (" and plots" if args.plots else ""))
    print("\n".join(summary_lines(rows, labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
