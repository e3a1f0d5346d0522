"""GPU check of DSDE's pure-torch parts: one command, a few minutes on one GPU.

    python tools/gpu_check.py [--out DIR]          # on a machine with a CUDA GPU
    python tools/gpu_check.py --dry-run [--out DIR]  # anywhere: CPU, small shapes (CI)

Needs torch only (and numpy, which torch wheels usually bring): it imports DSDE's pure
parts (``config``, ``core``, ``runtime``, ``staging``) and checks that doing so imported
no SGLang. What it checks, at GPU shapes (batch 1-256, vocabularies of 32k and 128k,
up to 10 drafted tokens):

1. ``sync``: every policy's round path through the runtime (the worker's call sequence
   under the overlap scheduler: slot hooks, ``next_batch_steps`` with lag 1, the round's
   cost sample, draft-step recording, ``on_verify``, the next first draft) under
   ``torch.cuda.set_sync_debug_mode("error")``, with the cost sample shared over a
   one-rank NCCL group as under TP (any host synchronisation raises);
2. ``overhead``: the round path's device time and host time per round, per policy and shape,
   against a verify-sized matmul (the target's LM head: ``bs * (K + 1)`` tokens x hidden
   4096 x V, bfloat16; a whole verify forward costs far more);
3. ``graphs``: the draft-step recording (``record_draft_step``) captured in a CUDA graph at
   each padded batch size and replayed with fewer real rows: the rows the verify reads
   hold what was drafted;
4. ``memory``: the runtime's device buffers per shape.

Writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` (default
``gpu_check_out/``); exits non-zero when a check fails. ``--dry-run`` runs the same code
on the CPU at small shapes (no sync mode, graphs replaced by eager copies at the padded
sizes, gloo instead of NCCL).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sglang_dsde.config import POLICY_CHOICES, DSDEConfig  # noqa: E402
from sglang_dsde.runtime import DSDERuntime  # noqa: E402

#: The GPU grid and the dry run's.
FULL = dict(vocabs=(32000, 128256), batch_sizes=(1, 16, 64, 256), steps=(2, 10),
            max_slots=256, hidden=4096, graph_bs=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            graph_steps=(2, 4, 10), rounds=6, timed=10)
DRY = dict(vocabs=(256,), batch_sizes=(1, 4), steps=(2, 4), max_slots=8, hidden=32,
           graph_bs=(1, 2, 4, 8), graph_steps=(2, 4), rounds=3, timed=2)
MAX_STEPS = 10


def sglang_modules() -> list:
    return sorted(m for m in sys.modules if m == "sglang" or m.startswith("sglang."))


def make_runtime(policy: str, device, vocab: int, max_slots: int, share=None):
    cfg = DSDEConfig(policy=policy, max_steps=MAX_STEPS)
    return DSDERuntime(cfg, max_slots=max_slots, max_rows=max_slots, vocab_size=vocab,
                       initial_steps=4, device=device, lag_rounds=1, share=share)


class Inputs:
    """Logits and accept lengths for rounds of ``bs`` requests drafting ``steps``."""

    def __init__(self, bs: int, steps: int, vocab: int, device):
        gen = torch.Generator(device=device).manual_seed(bs * 100 + steps)
        self.slots = torch.arange(bs, device=device)
        self.draft = torch.randn(max(steps, 1), bs, vocab, device=device, generator=gen)
        self.target = torch.randn(bs * (steps + 1), vocab, device=device, generator=gen)
        self.accept = torch.randint(1, steps + 2, (bs,), device=device, generator=gen)
        self.temperature = torch.zeros(bs, device=device)


def play_round(rt: DSDERuntime, x: Inputs, steps: int, clock: float) -> int:
    """The worker's calls for one decode round (module docstring, check 1)."""
    bs = int(x.slots.shape[0])
    decided = rt.next_batch_steps(x.slots)
    rt.on_decode_round_start(bs, steps, clock)
    rt.begin_round(x.slots, steps)
    for j in range(1, steps):
        rt.record_draft_step(x.draft[j], steps=steps)
    rt.on_verify(x.slots, steps, x.target, x.accept, x.temperature)
    rt.record_first_draft(x.slots, x.draft[0])
    return decided


def one_rank_share(device):
    """A ``share`` over a one-process group (NCCL on CUDA, gloo on CPU), as under TP."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
        path = Path(tempfile.mkdtemp()) / "rendezvous"
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1,
                                **({"device_id": device} if backend == "nccl" else {}))

    def share(t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0)
        return t
    return share


def check_sync(device, grid) -> dict:
    """Check 1: rounds of every policy under the sync debug mode (CUDA only)."""
    vocab, bs, steps = grid["vocabs"][-1], grid["batch_sizes"][-1], grid["steps"][-1]
    share = one_rank_share(device)
    share(torch.zeros(3, dtype=torch.float64, device=device))  # the communicator, once
    out = {}
    for policy in POLICY_CHOICES:
        rt = make_runtime(policy, device, vocab, grid["max_slots"], share=share)
        x = Inputs(bs, steps, vocab, device)
        rt.on_slots_allocated(list(range(bs)))
        # One round first, outside the mode: library handles and first-use allocations
        # (a server's first round pays them once, like its first CUDA-graph replay).
        play_round(rt, x, steps, 0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for r in range(1, grid["rounds"] + 1):
                if r == 2:  # requests leave and join between rounds
                    rt.on_slots_freed([0, 1])
                    rt.on_slots_allocated([0, 1])
                play_round(rt, x, steps, 0.01 * r)
            out[policy] = {"ok": True}
        except Exception as exc:  # the sync's stack, for the report
            out[policy] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                           "where": traceback.format_exc(limit=-6)}
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
    return {"vocab": vocab, "batch_size": bs, "steps": steps, "policies": out,
            "ok": all(v["ok"] for v in out.values()),
            "mode": "set_sync_debug_mode('error')" if device.type == "cuda" else "cpu (none)"}


def _timer(device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def begin():
            start.record()

        def finish() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return begin, finish
    t0 = [0.0]

    def begin_cpu():
        t0[0] = time.perf_counter()

    def finish_cpu() -> float:
        return time.perf_counter() - t0[0]
    return begin_cpu, finish_cpu


def check_overhead(device, grid) -> list:
    """Check 2: per-round GPU and host time of the round path vs an LM-head matmul."""
    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    begin, finish = _timer(device)
    for vocab in grid["vocabs"]:
        weight = torch.randn(grid["hidden"], vocab, device=device, dtype=dtype)
        for policy in POLICY_CHOICES:
            rt = make_runtime(policy, device, vocab, grid["max_slots"])
            for bs in grid["batch_sizes"]:
                rt.on_slots_allocated(list(range(bs)))
                for steps in grid["steps"]:
                    x = Inputs(bs, steps, vocab, device)
                    hidden = torch.randn(bs * (steps + 1), grid["hidden"], device=device,
                                         dtype=dtype)
                    for r in range(2):  # warm-up (first kernels, allocator)
                        play_round(rt, x, steps, 0.01 * r)
                        hidden @ weight
                    gpu, host, verify = [], [], []
                    for r in range(grid["timed"]):
                        begin()
                        t0 = time.perf_counter()
                        play_round(rt, x, steps, 0.01 * r)
                        host.append(time.perf_counter() - t0)
                        gpu.append(finish())
                        begin()
                        hidden @ weight
                        verify.append(finish())
                    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
                    rows.append({"policy": policy, "vocab": vocab, "batch_size": bs,
                                 "steps": steps, "round_ms": 1e3 * med(gpu),
                                 "host_ms": 1e3 * med(host),
                                 "lm_head_ms": 1e3 * med(verify),
                                 "ratio": med(gpu) / max(med(verify), 1e-9)})
                rt.on_slots_freed(list(range(bs)))
            del rt
        del weight
    return rows


def check_graphs(device, grid) -> dict:
    """Check 3: the draft-step recording captured at padded sizes, replayed with fewer
    real rows (CUDA graphs on CUDA; eager copies at the padded sizes on CPU)."""
    vocab = grid["vocabs"][0]
    rt = make_runtime("goodput", device, vocab, grid["max_slots"])
    cases, ok = [], True
    for steps in grid["graph_steps"]:
        for padded in [b for b in grid["graph_bs"] if b <= grid["max_slots"]]:
            static_in = torch.zeros(steps, padded, vocab, device=device)

            def draft_loop():
                rt.begin_draft_steps()
                for j in range(1, steps):
                    rt.record_draft_step(static_in[j], steps=steps)
            if device.type == "cuda":
                graph = torch.cuda.CUDAGraph()
                draft_loop()  # warm-up on the capture stream's device, as SGLang does
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    draft_loop()
                run = graph.replay
            else:
                run = draft_loop
            real = max(1, padded - 1)
            values = torch.randn(steps, real, vocab, device=device)
            static_in.zero_()
            static_in[:, :real] = values
            run()
            got = rt.round_draft_logits(real, steps)
            match = all(torch.equal(got[:, j], values[j]) for j in range(1, steps))
            ok &= match
            cases.append({"steps": steps, "padded": padded, "real": real, "match": match})
    return {"vocab": vocab, "cases": cases, "ok": ok,
            "mode": "CUDA graph capture + replay" if device.type == "cuda" else "eager (cpu)"}


def check_memory(device, grid) -> list:
    """Check 4: the runtime's device buffers (goodput, the largest policy state)."""
    rows = []
    for vocab in grid["vocabs"]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
            rt = make_runtime("goodput", device, vocab, grid["max_slots"])
            used = torch.cuda.memory_allocated(device) - before
        else:
            rt = make_runtime("goodput", device, vocab, grid["max_slots"])
            used = sum(t.numel() * t.element_size() for t in
                       (rt.slot_first_draft, rt._round_draft))
        rows.append({"vocab": vocab, "max_slots": grid["max_slots"],
                     "max_steps": MAX_STEPS, "bytes": int(used),
                     "draft_buffer_bytes": rt._round_draft.numel() * 4,
                     "first_draft_bytes": rt.slot_first_draft.numel() * 4})
        del rt
    return rows


def markdown(report: dict) -> str:
    lines = [f"# DSDE GPU check ({report['device']})", "",
             f"torch {report['torch']}, {report['when']}, {report['seconds']:.0f} s; "
             f"SGLang imported: {report['sglang_imported'] or 'no'}; "
             f"all checks {'passed' if report['ok'] else 'FAILED'}.", "",
             f"## Sync ({report['sync']['mode']}, V {report['sync']['vocab']}, "
             f"bs {report['sync']['batch_size']}, K {report['sync']['steps']})", ""]
    for policy, res in report["sync"]["policies"].items():
        lines.append(f"- {policy}: {'no host sync' if res['ok'] else res['error']}")
    lines += ["", "## Per-round overhead (median; LM head = bs(K+1) x hidden x V matmul)", "",
              "| policy | V | bs | K | round device ms | host ms | LM head ms | "
              "round / LM head |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["overhead"]:
        lines.append(f"| {r['policy']} | {r['vocab']} | {r['batch_size']} | {r['steps']} | "
                     f"{r['round_ms']:.3f} | {r['host_ms']:.3f} | {r['lm_head_ms']:.3f} | "
                     f"{r['ratio']:.2f} |")
    g = report["graphs"]
    bad = [c for c in g["cases"] if not c["match"]]
    lines += ["", f"## Draft-step recording ({g['mode']}, V {g['vocab']})", "",
              f"{len(g['cases'])} cases (K x padded batch size), "
              f"{'all reads match' if not bad else f'{len(bad)} mismatched: {bad}'}.", "",
              "## Runtime buffers", "", "| V | slots | max K | bytes |", "|---|---|---|---|"]
    for m in report["memory"]:
        lines.append(f"| {m['vocab']} | {m['max_slots']} | {m['max_steps']} | "
                     f"{m['bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, small shapes (CI)")
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (dry run: 1)")
    args = p.parse_args(argv)
    imported = sglang_modules()
    if args.dry_run:
        device, grid = torch.device("cpu"), DRY
        torch.set_num_threads(args.threads or 1)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device, grid = torch.device("cuda", torch.cuda.current_device()), FULL
        torch.cuda.set_device(device)
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({platform.processor() or platform.machine()})",
              "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M"),
              "dry_run": args.dry_run, "sglang_imported": imported, "grid": grid}
    report["sync"] = check_sync(device, grid)
    report["graphs"] = check_graphs(device, grid)
    report["memory"] = check_memory(device, grid)
    report["overhead"] = check_overhead(device, grid)
    report["seconds"] = time.time() - t0
    report["ok"] = bool(not imported and report["sync"]["ok"] and report["graphs"]["ok"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
