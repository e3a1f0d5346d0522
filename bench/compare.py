"""Real-engine comparison: every contender on a fresh SGLang CPU server, driven by
``python -m sglang.bench_serving`` on the offline workloads.

    python bench/compare.py --quick          # make bench-quick: mix, C 1/4, T 0
    python bench/compare.py                  # make bench: chat/code/mix, C 1/8, T 0/1

Contenders: the comparison's one list (``sglang_dsde.sim.contenders``): ``static:0`` (no
speculation), ``static:k`` (SGLang's STANDALONE with ``--speculative-num-steps k``), then
the policies on the DSDE worker (``sglang_adaptive``, ``dsde``, ``dsde+cut``, ``goodput``,
``adaedl``), each with ``--dsde-max-steps`` steps at most. One server per contender (the accept length
in ``/server_info`` is cumulative, so nothing leaks between contenders); every cell
(workload x concurrency x temperature) runs on it in a fixed order. Per-cell accept
length comes from the server's per-round decode log (``--decode-log-interval 1``):
sum(accept len x #running-req) / sum(#running-req) over the cell's log lines, i.e.
tokens per request-round as SGLang counts them.

Outputs under ``--out`` (default bench/results/engine/): ``{quick,full}.md/.json``
(``report.write_tables``), ``{stem}_latency.png``, ``{stem}_ratio.png``,
``{stem}_sl_over_time.png`` (per-request SL from ``meta_info["dsde_sl"]``),
``{stem}_cpu_cost.json`` (``fit_linear_cost`` on the static servers' round timings) and
the accept-length validation against a recorded trace (``--validate-trace``).
No SGLang internals are imported: HTTP API and bench_serving as a subprocess only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CELL_KEYS = ("workload", "concurrency", "temperature")
DSDE_MAX_STEPS = 4

#: Markdown columns (key, header, format); latencies in s, TPOT in ms.
COLUMNS = (("contender", "contender", "{}"), ("accept_length", "accept len", "{:.2f}"),
           ("throughput", "tok/s", "{:.2f}"), ("latency_mean", "E2E mean s", "{:.2f}"),
           ("latency_p50", "E2E p50 s", "{:.2f}"), ("latency_p99", "E2E p99 s", "{:.2f}"),
           ("tpot_mean", "TPOT ms", "{:.1f}"), ("speedup", "x no-spec", "{:.3f}"),
           ("vs_static_opt", "x static-opt", "{:.3f}"),
           ("vs_static_global", "x static-global", "{:.3f}"))


def contenders_for(static_steps: Sequence[int]) -> list:
    """The comparison's one contender list (``sglang_dsde.sim.contenders``): no
    speculation, static SL per k (SGLang's STANDALONE), then the policies on DSDE."""
    from sglang_dsde.sim.contenders import comparison_contenders

    return comparison_contenders(static_steps)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="mix only, C 1/4, T 0, static k 1/2, few prompts (make bench-quick)")
    p.add_argument("--workloads", nargs="+", choices=("chat", "code", "mix"))
    p.add_argument("--concurrency", nargs="+", type=int)
    p.add_argument("--temperatures", nargs="+", type=float)
    p.add_argument("--static-steps", nargs="+", type=int)
    p.add_argument("--contenders", nargs="+", help="subset of contender names to run")
    p.add_argument("--num-prompts", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--dsde-max-steps", type=int, default=DSDE_MAX_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sl-requests", type=int, default=3,
                   help="concurrent /generate calls per DSDE contender for the SL plot")
    p.add_argument("--validate-trace", help="trace of the same workload (record_traces.py)")
    p.add_argument("--out", default=str(REPO / "bench/results/engine"))
    p.add_argument("--stem", help="output file stem (default quick or full)")
    p.add_argument("--cache", help="model cache (default .cache/models)")
    a = p.parse_args(argv)
    quick = a.quick
    a.workloads = a.workloads or (["mix"] if quick else ["chat", "code", "mix"])
    a.concurrency = a.concurrency or ([1, 4] if quick else [1, 8])
    a.temperatures = a.temperatures or ([0.0] if quick else [0.0, 1.0])
    a.static_steps = a.static_steps or ([1, 2] if quick else [1, 2, 4])
    a.num_prompts = a.num_prompts or (6 if quick else 16)
    a.max_new_tokens = a.max_new_tokens or (32 if quick else 48)
    a.stem = a.stem or ("quick" if quick else "full")
    if any(c < 1 for c in a.concurrency) or a.num_prompts < 1 or a.max_new_tokens < 4:
        p.error("concurrency >= 1, num-prompts >= 1 and max-new-tokens >= 4 required")
    known = {c.name for c in contenders_for(a.static_steps)}
    if a.contenders and not set(a.contenders) <= known:
        p.error(f"unknown contender(s) {sorted(set(a.contenders) - known)}; known {sorted(known)}")
    return a


# ------------------------------------------------------------------ pure helpers
_DECODE_RE = re.compile(r"Decode batch.*?#running-req: (\d+),(?:.*?accept len: ([\d.]+),)?"
                        r".*?gen throughput \(token/s\): ([\d.]+)")


def parse_decode_lines(text: str) -> List[Tuple[int, float, float]]:
    """``(running_reqs, accept_len, gen_throughput)`` per SGLang decode log line
    (accept_len 1.0 when the line has none, i.e. no speculation)."""
    out = []
    for m in _DECODE_RE.finditer(text):
        al = float(m.group(2)) if m.group(2) is not None else 1.0
        out.append((int(m.group(1)), al, float(m.group(3))))
    return out


def cell_accept_length(lines: Sequence[Tuple[int, float, float]]) -> Optional[float]:
    """Tokens per request-round over a cell's decode lines (bs-weighted accept len)."""
    reqs = sum(n for n, _, _ in lines)
    return sum(n * al for n, al, _ in lines) / reqs if reqs else None


def round_samples(lines: Iterable[Tuple[int, float, float]], steps: int
                  ) -> List[Tuple[int, int, float]]:
    """``(bs, steps, seconds)`` per decode round: tokens / throughput at interval 1."""
    return [(n, steps, n * al / thr) for n, al, thr in lines if thr > 0]


def median_samples(samples: Iterable[Tuple[int, int, float]]) -> List[Tuple[int, int, float]]:
    """One median time per (bs, steps): round gaps include prefills and idle polls."""
    groups: Dict[Tuple[int, int], List[float]] = {}
    for b, k, s in samples:
        groups.setdefault((b, k), []).append(s)
    out = []
    for (b, k), ts in sorted(groups.items()):
        ts = sorted(ts)
        out.append((b, k, ts[len(ts) // 2]))
    return out


def bench_row(result: dict, *, contender: str, accept_length: Optional[float], **cell) -> dict:
    """A report row from one bench_serving JSONL record (times in s, TPOT in ms)."""
    def s(key):
        v = result.get(key)
        return None if v is None else float(v) / 1000.0

    return {**cell, "contender": contender, "unit": "s",
            "num_requests": result.get("completed"),
            "num_tokens": result.get("total_output_tokens"),
            "duration": result.get("duration"),
            "throughput": float(result["output_throughput"]),
            "latency_mean": s("mean_e2e_latency_ms"),
            "latency_p50": s("median_e2e_latency_ms"),
            "latency_p99": s("p99_e2e_latency_ms"),
            "ttft_mean": s("mean_ttft_ms"),
            "tpot_mean": result.get("mean_tpot_ms"),
            "accept_length": accept_length,
            "server_accept_length": result.get("accept_length")}


def sl_log(answers: Dict[str, List[int]]) -> List[Dict[str, int]]:
    """Per-request SL lists (``meta_info["dsde_sl"]``) -> one dict per round, for
    ``plots.plot_steps_over_time`` (requests started together, so round i aligns)."""
    rounds = max((len(v) for v in answers.values()), default=0)
    return [{rid: int(v[i]) for rid, v in answers.items() if i < len(v)}
            for i in range(rounds)]


def validation_rows(sim: Dict[int, float], engine: Dict[int, Optional[float]]) -> List[dict]:
    """Simulated vs engine static accept length per k, with the relative error."""
    out = []
    for k in sorted(engine):
        e, s = engine[k], sim.get(k)
        err = (s - e) / e if e and s is not None else None
        out.append({"k": k, "engine": e, "sim": s, "rel_err": err,
                    "within_5pct": None if err is None else abs(err) <= 0.05})
    return out


def bench_serving_cmd(*, base_url: str, model, dataset: Path, num_prompts: int,
                      max_new_tokens: int, concurrency: int, temperature: float,
                      seed: int, output_file: Path) -> List[str]:
    return [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
            "--base-url", base_url, "--model", str(model), "--tokenizer", str(model),
            "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--num-prompts", str(num_prompts), "--sharegpt-output-len", str(max_new_tokens),
            "--max-concurrency", str(concurrency), "--request-rate", "inf",
            "--temperature", str(temperature), "--seed", str(seed),
            "--warmup-requests", "0", "--output-file", str(output_file)]


# ------------------------------------------------------------------ engine runs
def write_dataset(path: Path, prompts, tokenizer) -> Path:
    """A bench_serving ``custom`` JSONL: the prompt text decoded from ``input_ids`` (chat
    template already applied) and a dummy answer (output length is fixed anyway)."""
    with open(path, "w") as f:
        for p in prompts:
            text = tokenizer.decode(list(p.input_ids), skip_special_tokens=False)
            f.write(json.dumps({"id": p.id, "conversations": [
                {"role": "user", "content": text},
                {"role": "assistant", "content": "ok ok ok ok"}]}) + "\n")
    return path


def _log_size(server) -> int:
    try:
        return server.log_path.stat().st_size
    except OSError:
        return 0


def _log_slice(server, start: int, end: int) -> str:
    with open(server.log_path, "rb") as f:
        f.seek(start)
        return f.read(end - start).decode("utf-8", "replace")


def _dsde_state(server) -> Optional[dict]:
    try:
        for state in server.server_info().get("internal_states", []) or []:
            if "dsde" in state:
                return state["dsde"]
    except Exception:  # noqa: BLE001 - diagnostics only
        pass
    return None


def _sl_traces(server, prompts, max_new_tokens: int, n: int) -> Dict[str, List[int]]:
    """``meta_info["dsde_sl"]`` of ``n`` concurrent greedy /generate calls."""
    answers: Dict[str, List[int]] = {}

    def one(p):
        try:
            r = server.generate(input_ids=list(p.input_ids), max_new_tokens=max_new_tokens,
                                ignore_eos=True)
            sl = r.get("meta_info", {}).get("dsde_sl")
            if sl is not None:
                answers[p.id] = [int(x) for x in (sl if isinstance(sl, list) else [sl])]
        except Exception as e:  # noqa: BLE001
            print(f"    SL trace of {p.id} failed: {e}", flush=True)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts[:n]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def server_kwargs(c, draft, max_steps: int) -> dict:
    """How the engine runs contender ``c``, with the per-round decode log on."""
    kw = c.server_kwargs(draft, max_steps=max_steps)
    kw["extra_args"] = kw["extra_args"] + ["--log-level", "info", "--decode-log-interval", "1"]
    return kw


def run_contender(c, *, pair, datasets: Dict[str, Path], args,
                  work: Path, prompts) -> Tuple[List[dict], List[Tuple[int, int, float]], dict]:
    from tools.serving import running_server

    rows, samples, extra = [], [], {}
    kw = server_kwargs(c, pair.draft, args.dsde_max_steps)
    algorithm = kw["algorithm"]
    t0 = time.monotonic()
    with running_server(pair.target, max_total_tokens=4096, log_dir=work / "logs",
                        startup_timeout=600, **kw) as server:
        print(f"  server up in {time.monotonic() - t0:.0f}s", flush=True)
        # Warm-up (first-call allocations) outside every cell's log window.
        server.generate(input_ids=list(prompts[0].input_ids), max_new_tokens=4)
        for w in args.workloads:
            for conc in args.concurrency:
                for temp in args.temperatures:
                    cell = {"workload": w, "concurrency": conc, "temperature": temp}
                    out = work / f"{c.name.replace(':', '_')}_{w}_c{conc}_t{temp}.jsonl"
                    out.unlink(missing_ok=True)
                    cmd = bench_serving_cmd(
                        base_url=server.base_url, model=pair.target, dataset=datasets[w],
                        num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                        concurrency=conc, temperature=temp, seed=args.seed, output_file=out)
                    before = _log_size(server)
                    t1 = time.monotonic()
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    time.sleep(0.5)  # let the scheduler flush its last decode log line
                    lines = parse_decode_lines(_log_slice(server, before, _log_size(server)))
                    if proc.returncode != 0 or not out.exists():
                        print(proc.stdout[-2000:], proc.stderr[-3000:], sep="\n")
                        raise RuntimeError(f"bench_serving failed for {c.name} {cell}")
                    result = json.loads(out.read_text().strip().splitlines()[-1])
                    al = cell_accept_length(lines) if algorithm else None
                    row = bench_row(result, contender=c.name, accept_length=al, **cell)
                    state = _dsde_state(server)
                    if state is not None:
                        row["dsde_steps_histogram"] = state.get("batch_steps_histogram")
                    rows.append(row)
                    if c.static_steps is not None and temp == 0:
                        samples += round_samples(lines, c.static_steps)
                    print(f"  {w} C={conc} T={temp}: {row['throughput']:.2f} tok/s, "
                          f"E2E {row['latency_mean']:.2f}s, accept "
                          f"{'-' if al is None else f'{al:.2f}'} "
                          f"({time.monotonic() - t1:.0f}s)", flush=True)
        if algorithm == "DSDE" and args.sl_requests > 0:
            extra["sl"] = _sl_traces(server, prompts, args.max_new_tokens, args.sl_requests)
            extra["dsde_state"] = _dsde_state(server)
        extra["server_accept_length"] = server.accept_length() if algorithm else None
    return rows, samples, extra


def validate(trace_path: str, rows: List[dict], prompt_ids: Sequence[str] = ()
             ) -> Optional[dict]:
    """Simulated static accept length (same workload, greedy, C = 1) vs the engine's, on
    the trace's requests that the engine ran (``prompt_ids``; all when empty)."""
    from sglang_dsde.sim import BS1_CPU, read_trace
    from sglang_dsde.sim.experiment import static_accept_lengths

    path = Path(trace_path)
    if path.is_dir():
        path = sorted(path.glob("*.jsonl"))[0]
    trace = read_trace(path)
    requests = [r for r in trace.requests if not prompt_ids or r.id in set(prompt_ids)]
    workload = trace.header.get("workload")
    engine = {}
    for r in rows:
        name = str(r["contender"])
        if (name.startswith("static:") and name != "static:0" and r["temperature"] == 0
                and r["concurrency"] == 1 and r["workload"] == workload):
            engine[int(name.split(":")[1])] = r["accept_length"]
    engine = {k: v for k, v in engine.items() if k <= trace.max_steps}
    if not engine or not requests:
        return None
    # At C = 1 a static schedule does not depend on the cost model (only times do).
    sim = static_accept_lengths(requests, max_steps=max(engine), concurrency=1,
                                cost=BS1_CPU)
    return {"trace": str(path), "workload": workload, "num_requests": len(requests),
            "draft": trace.header.get("draft"), "rows": validation_rows(sim, engine)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from bench import plots
    from bench.workloads import load_workload
    from sglang_dsde import models
    from sglang_dsde.sim import report

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pair = models.prepare(args.cache)
    print(f"target {pair.target}\ndraft  {pair.draft} ({pair.draft_kind})", flush=True)
    tok = AutoTokenizer.from_pretrained(str(pair.target))
    work = Path(tempfile.mkdtemp(prefix="dsde-compare-"))
    datasets, first_prompts, prompt_ids = {}, None, {}
    for w in args.workloads:
        prompts = load_workload(w, args.num_prompts, seed=args.seed, tokenizer=tok,
                                max_prompt_tokens=args.max_prompt_tokens)
        datasets[w] = write_dataset(work / f"{w}.jsonl", prompts, tok)
        first_prompts = first_prompts or prompts
        prompt_ids[w] = [p.id for p in prompts]
    contenders = [c for c in contenders_for(args.static_steps)
                  if not args.contenders or c.name in args.contenders]
    rows, samples, sl_logs, states, failed = [], [], {}, {}, []
    t_start = time.monotonic()
    for i, c in enumerate(contenders, 1):
        print(f"[{i}/{len(contenders)}] {c.name} ({time.monotonic() - t_start:.0f}s elapsed)",
              flush=True)
        try:
            r, s, extra = run_contender(c, pair=pair, datasets=datasets, args=args,
                                        work=work, prompts=first_prompts)
        except Exception as e:  # noqa: BLE001 - one broken contender must not lose the rest
            print(f"  {c.name} FAILED: {str(e)[-1500:]}", flush=True)
            failed.append(c.name)
            continue
        rows += r
        samples += s
        if extra.get("sl"):
            sl_logs[c.name] = sl_log(extra["sl"])
        if extra.get("dsde_state"):
            states[c.name] = extra["dsde_state"]
    report.add_ratios(rows, cell_keys=CELL_KEYS)
    report.add_single_static(rows, CELL_KEYS, across=("workload",))
    names = [c.name for c in contenders]
    notes = [f"target {pair.target.name}, draft {pair.draft.name} ({pair.draft_kind}); "
             f"{args.num_prompts} prompts x {args.max_new_tokens} output tokens (ignore_eos), "
             f"seed {args.seed}, CPU float32, 1 OpenMP thread, one server per contender",
             "accept len: tokens per request-round from the server's per-round decode log",
             "x static-opt: vs the best static SL (k=0 included) of the cell; "
             "x static-global: vs the static SL best across workloads (geo-mean)",
             f"DSDE contenders: --speculative-num-steps {args.dsde_max_steps} "
             f"--dsde-max-steps {args.dsde_max_steps}",
             f"wall time {time.monotonic() - t_start:.0f}s on a shared 2-core machine"]
    if failed:
        notes.append(f"FAILED contenders (see the log): {', '.join(failed)}")
    meta = {"args": {k: v for k, v in vars(args).items()}, "failed": failed,
            "target": str(pair.target),
            "draft": str(pair.draft), "draft_kind": pair.draft_kind, "dsde_states": states,
            "sl_logs": sl_logs}
    if samples:
        from sglang_dsde.sim import fit_linear_cost

        med = median_samples(samples)
        try:
            cost = fit_linear_cost(med, name="engine-cpu", unit="s",
                                   source="bench/compare.py decode-log round gaps (median "
                                          "per bs, k)")
            (out_dir / f"{args.stem}_cpu_cost.json").write_text(
                json.dumps({"cost": cost.to_json(), "samples": med}, indent=1) + "\n")
            meta["cpu_cost"] = cost.to_json()
        except Exception as e:  # noqa: BLE001
            print(f"cost fit skipped: {e}")
        meta["round_samples"] = med
    if args.validate_trace:
        val = validate(args.validate_trace, rows,
                       [i for ids in prompt_ids.values() for i in ids])
        meta["validation"] = val
        if val:
            for v in val["rows"]:
                notes.append(f"validation static:{v['k']}: engine {v['engine']:.3f}, "
                             f"sim {v['sim']:.3f}, rel err {100 * v['rel_err']:+.1f}%")
    report.write_tables(rows, out_dir / args.stem, title=f"Engine comparison ({args.stem})",
                        notes=notes, meta=meta, cell_keys=CELL_KEYS, columns=COLUMNS)
    plots.plot_latency(rows, out_dir / f"{args.stem}_latency.png", contenders=names,
                       cell_keys=CELL_KEYS)
    plots.plot_ratio_bars(rows, out_dir / f"{args.stem}_ratio.png", contenders=names,
                          cell_keys=CELL_KEYS, title="engine throughput / static-opt")
    if sl_logs:
        plots.plot_steps_over_time(sl_logs, out_dir / f"{args.stem}_sl_over_time.png",
                                   title="per-request SL (meta_info dsde_sl), greedy")
    print((out_dir / f"{args.stem}.md").read_text())
    print(f"done in {time.monotonic() - t_start:.0f}s; outputs in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
