"""Micro-benchmark: cost of one DSDE signal + policy update per verify round.

For each batch size (1, 8, 64), vocabulary (32k, 128k) and drafted width P (4, 10):
time ``kl_per_position`` over ``[bs, P, V]`` target/draft logits (float32, as SGLang's
logits processor returns them) plus ``DSDEPolicy.update`` for the batch, the update
alone, and a round in which nothing was drafted (the off state: ``update_off``, plus
goodput's round-cost sample; mean over a block of rounds). Median over repeats after
warm-up; seeded inputs.

On a CUDA device it also:
* times a verify-sized forward of a Llama-3-8B-shaped layer stack, matmul-only (32 layers:
  QKV 4096 -> 6144, O 4096 -> 4096, gate+up 4096 -> 28672, down 14336 -> 4096, plus the
  128256-wide LM head; bf16; attention, norms, rotary and activations are omitted, so the
  forward is under-estimated and the ratio over-estimated), on ``bs * (P + 1)`` tokens, and
  reports signal+policy / forward;
* times the same signal + update captured in one CUDA graph (possible because the update
  path never synchronises with the host), and checks that under
  ``torch.cuda.set_sync_debug_mode("error")``.

Writes ``bench/results/micro_policy_<device>.md`` (a table) and ``.json``. Not a test.

    python bench/micro_policy.py [--device cpu|cuda] [--quick] [--policy dsde|goodput]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sglang_dsde.config import DSDEConfig  # noqa: E402
from sglang_dsde.core import entropy_of_logits, kl_per_position, make_policy  # noqa: E402
from sglang_dsde.core.round_cost import round_sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Off rounds timed together (goodput reviews its estimates every few off rounds).
OFF_BLOCK = 16
LLAMA8B = dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)


def timed(fn, device, repeats: int, warmup: int = 2, stat=statistics.median) -> float:
    """Median (or ``stat``) wall time of ``fn()`` in ms (device-synchronised)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return stat(samples)


class RoundInputs:
    """Seeded inputs of one verify round and a policy whose slots are past warm-up."""

    def __init__(self, bs: int, vocab: int, width: int, device: torch.device, seed: int,
                 policy: str = "dsde"):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.target = torch.randn(bs, width, vocab, device=device, generator=gen) * 3
        self.draft = self.target + torch.randn(bs, width, vocab, device=device, generator=gen)
        self.slots = torch.randperm(4 * bs, device=device, generator=gen)[:bs]
        self.drafted = torch.full((bs,), width, device=device, dtype=torch.int64)
        self.accepted = torch.randint(0, width + 1, (bs,), device=device, generator=gen)
        self.temperature = torch.where(torch.arange(bs, device=device) % 2 == 0, 0.0, 0.8)
        cfg = DSDEConfig(policy=policy, max_steps=max(10, width))
        self.policy = make_policy(cfg, max_slots=4 * bs, device=device,
                                  default_initial_steps=4)
        kl = torch.rand(bs, width, device=device, generator=gen, dtype=torch.float64)
        for _ in range(cfg.window // width + 2):  # get every slot past warm-up
            self.policy.update(self.slots, self.drafted, self.accepted, req_kl=kl,
                               req_temperature=self.temperature)
        self.kl = kl
        # The goodput policy's round also reads the first drafts' entropy before drafting
        # and learns the round's time after it; both are part of its per-round cost.
        self.goodput = self.policy.needs_first_entropy
        self.first_draft = self.draft[:, 0].contiguous()
        self.batch_size, self.width = bs, width

    def _round(self, kl):
        if self.goodput:
            self.policy.observe_first_entropy(self.slots, entropy_of_logits(self.first_draft))
            self.policy.batch_steps_for(self.slots)
        decision = self.policy.update(self.slots, self.drafted, self.accepted, req_kl=kl,
                                      req_temperature=self.temperature)
        if self.goodput:
            self.policy.observe_round(round_sample(self.batch_size, self.width, 0.05,
                                                 device=self.policy.device))
        return decision

    def signal_and_update(self):
        return self._round(kl_per_position(self.target, self.draft, self.drafted,
                                           self.temperature))

    def update_only(self):
        return self._round(self.kl)

    def off_rounds(self, rounds: int = OFF_BLOCK):
        """``rounds`` rounds in which nothing was drafted (the off state), as the engine
        plays them: the policy's off update, and (goodput) the round's cost sample."""
        for _ in range(rounds):
            self.policy.update_off(self.slots)
            if self.goodput:
                self.policy.observe_round(round_sample(self.batch_size, 0, 0.05,
                                                     device=self.policy.device))


class LayerStack:
    """Matmul-only Llama-8B-shaped verify forward (see module docstring)."""

    def __init__(self, device: torch.device, shape=LLAMA8B):
        h, i = shape["hidden"], shape["intermediate"]
        kv = h // shape["heads"] * shape["kv_heads"]
        def w(rows, cols):
            return torch.empty(rows, cols, device=device, dtype=torch.bfloat16).normal_(0, 0.02)
        self.layers = [(w(h, h + 2 * kv), w(h, h), w(h, 2 * i), w(i, h))
                       for _ in range(shape["layers"])]
        self.lm_head = w(h, shape["vocab"])
        self.hidden, self.intermediate = h, i

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens
        for qkv, o, gate_up, down in self.layers:
            attn = (x @ qkv)[:, :self.hidden]  # stand-in for attention output
            x = x + attn @ o
            g = x @ gate_up
            x = x + g[:, :self.intermediate] @ down
        return x @ self.lm_head


def graph_timing(inputs: RoundInputs, device, repeats: int):
    """(ms, sync_check) for signal + update captured in one CUDA graph."""
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            inputs.signal_and_update()
            sync_check = "no host sync (set_sync_debug_mode=error passed)"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    except RuntimeError as exc:
        sync_check = f"host sync detected: {str(exc).splitlines()[0]}"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                inputs.signal_and_update()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            inputs.signal_and_update()
        return timed(graph.replay, device, repeats), sync_check
    except Exception as exc:  # report, do not hide: the figure is then missing
        return f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", sync_check


def device_agreement(device: torch.device, rounds: int = 60, seed: int = 0) -> dict:
    """Run the same random rounds through the policy (and KL) on ``device`` and on the
    CPU: the decisions must be identical and the KL equal to float32 rounding."""
    gen = torch.Generator().manual_seed(seed)
    cfg = DSDEConfig(policy="dsde", window=12)
    pols = {d: make_policy(cfg, max_slots=32, device=d, default_initial_steps=4)
            for d in ("cpu", device)}
    identical, kl_rel = True, 0.0
    for _ in range(rounds):
        bs = int(torch.randint(1, 17, (1,), generator=gen))
        slots = torch.randperm(32, generator=gen)[:bs]
        drafted = torch.randint(0, 11, (bs,), generator=gen)
        accepted = (torch.rand(bs, generator=gen) * (drafted + 1)).long().clamp_max(drafted)
        target = torch.randn(bs, 10, 4096, generator=gen) * 3
        draft = target + torch.randn(bs, 10, 4096, generator=gen)
        temps = torch.where(torch.rand(bs, generator=gen) < 0.5, 0.0, 0.7)
        out = {}
        for d, pol in pols.items():
            args = [t.to(d) for t in (target, draft, drafted, temps)]
            kl = kl_per_position(*args)
            dec = pol.update(slots.to(d), drafted.to(d), accepted.to(d), req_kl=kl,
                             req_temperature=temps.to(d))
            out[d] = (kl.cpu(), dec.req_steps.cpu(), int(dec.cap))
        (kl_a, steps_a, cap_a), (kl_b, steps_b, cap_b) = out.values()
        # Decisions can only differ if float rounding flips a threshold; report, not hide.
        identical &= torch.equal(steps_a, steps_b) and cap_a == cap_b
        kl_rel = max(kl_rel, ((kl_a - kl_b).abs() / kl_a.abs().clamp_min(1e-6)).max().item())
        pols[device].steps_for(slots.to(device))
    return dict(rounds=rounds, decisions_identical=bool(identical), kl_max_rel_diff=kl_rel)


def measure_row(row: dict, device, repeats: int, stack, policy: str = "dsde") -> None:
    inputs = RoundInputs(row["bs"], row["vocab"], row["width"], device,
                         seed=row["bs"] * 1000 + row["width"], policy=policy)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    samples = []
    row["signal_update_ms"] = timed(inputs.signal_and_update, device, repeats,
                                    stat=lambda xs: samples.extend(xs) or statistics.median(xs))
    row["signal_update_min_ms"] = min(samples)
    row["update_only_ms"] = timed(inputs.update_only, device, repeats)
    row["off_round_ms"] = timed(inputs.off_rounds, device, repeats) / OFF_BLOCK
    row["logits_mib"] = 2 * inputs.target.numel() * 4 / 2**20
    if device.type != "cuda":
        return
    row["peak_temp_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    tokens = torch.randn(row["bs"] * (row["width"] + 1), LLAMA8B["hidden"], device=device,
                         dtype=torch.bfloat16)
    row["verify_forward_ms"] = timed(lambda: stack.forward(tokens), device, repeats)
    row["ratio"] = row["signal_update_ms"] / row["verify_forward_ms"]
    # Last: a failed capture can leave the device unusable for what follows in the row.
    row["graph_ms"], row["sync_check"] = graph_timing(inputs, device, repeats)
    if isinstance(row["graph_ms"], float):
        row["graph_ratio"] = row["graph_ms"] / row["verify_forward_ms"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--policy", choices=("dsde", "goodput"), default="dsde",
                        help="policy whose per-round path is timed (goodput adds the first "
                             "drafts' entropy and the round-cost update)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.batch_sizes, args.vocabs, args.widths = [1, 8], [32768], [4]
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, "
               f"{torch.get_num_threads()} threads",
               torch=torch.__version__, repeats=repeats, logits_dtype="float32",
               policy=args.policy)
    print(f"micro_policy on {env['device']} (torch {env['torch']}), median of {repeats}",
          flush=True)
    if device.type == "cuda":
        env["agreement_with_cpu"] = device_agreement(device)
        print(f"  agreement with CPU: {env['agreement_with_cpu']}", flush=True)
    stack = LayerStack(device) if device.type == "cuda" else None
    rows = []
    for vocab in args.vocabs:
        for width in args.widths:
            for bs in args.batch_sizes:
                row = dict(bs=bs, vocab=vocab, width=width)
                try:
                    measure_row(row, device, repeats, stack, args.policy)
                except Exception as exc:  # keep the other rows; say what broke
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                rows.append(row)
                print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
                write_results(args.out, device, env, rows, quiet=True)
    write_results(args.out, device, env, rows)
    return 0


def write_results(out: Path, device, env: dict, rows: list, quiet: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if env.get("policy", "dsde") == "dsde" else f"_{env['policy']}"
    stem = out / f"micro_policy_{device.type}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(dict(env=env, rows=rows), indent=1) + "\n")
    cols = ["bs", "vocab", "width", "signal_update_ms", "signal_update_min_ms", "update_only_ms",
            "off_round_ms", "logits_mib"]
    if device.type == "cuda":
        cols += ["peak_temp_mib", "graph_ms", "verify_forward_ms", "ratio", "graph_ratio"]
    if any("error" in row for row in rows):
        cols.append("error")
    lines = [f"# micro_policy on {env['device']}",
             "",
             f"torch {env['torch']}; median of {env['repeats']}; logits {env['logits_dtype']}; "
             f"signal = kl_per_position over [bs, width, vocab]; update = the "
             f"{env.get('policy', 'dsde')} policy's round (requests past warm-up); off_round = "
             f"a round that drafted nothing (mean over {OFF_BLOCK}). verify_forward = matmul-only Llama-8B-shaped stack on "
             "bs*(width+1) tokens (attention omitted), bf16.",
             "",
             "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(
            f"{row.get(c):.3f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in cols) + " |")
    checks = sorted({row["sync_check"] for row in rows if "sync_check" in row})
    if "agreement_with_cpu" in env:
        checks.append(f"same rounds on this device and on the CPU: {env['agreement_with_cpu']}")
    if device.type == "cpu":
        checks.append("CPU only: the GPU columns (verify-forward ratio, CUDA-graph timing, "
                      "sync check) come from `python bench/micro_policy.py --device cuda`.")
    lines += [""] + [f"- {c}" for c in checks]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print(f"wrote {stem}.md and {stem}.json", flush=True)


if __name__ == "__main__":
    sys.exit(main())
