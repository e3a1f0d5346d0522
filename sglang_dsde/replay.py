"""Policy replay: run a speculation-length policy over a trace, print its decisions.

Usage::

    python -m sglang_dsde.replay TRACE.jsonl [--policy P] [--window N] ... \
        [--cost SPEC] [--concurrency C]

Knob flags are generated from ``DSDEConfig``'s fields (``--window``, ``--batch-cap`` /
``--no-batch-cap``, ...; the plugin's ``--dsde-`` spelling is accepted too). ``TRACE`` is
read by ``sglang_dsde.trace.read_trace`` and may be either view of the one trace format:

* **a round view** (one line per verify round and request; docs/algorithm.md, "Policy
  replay"): replayed *open loop*: each round feeds the policy what the line says was
  drafted, accepted and measured. A policy that prices rounds (``goodput``) gets each
  round's ``seconds`` from the lines, else the cost model ``--cost`` names, else nothing
  (it keeps its prior);
* **a trace** (per position, with a header): replayed *closed loop*: the simulator runs
  the policy over the trace's requests at ``--concurrency`` (default 1) with the cost
  model ``--cost`` (default ``bs1-cpu``): the same rounds and decisions as
  ``sglang_dsde.sim.simulate`` with that cost model.

Both step the policy through the core's ``PolicyDriver``, as the engine does. Output: one
JSON line per round, ``{"round": 12, "cap": 5, "steps": {"a": 5, "b": 3}}``, each
request of the round with its SL for its next round (``cap`` null when no request of the
round is past warm-up, capping is off, or the policy has no cap). In the closed loop the
rounds are numbered from 0.

Decisions where the format leaves room (documented here, tested in tests/unit):

* ``steps`` lists exactly the requests of that round's batch, in trace order; a request
  absent from the round keeps its state and is not listed. A request whose ``done`` is
  set is listed and then forgotten: a later line with the same id is a new request.
* The initial SL is ``config.initial_steps_for``: 4 unless ``--initial-steps`` is given,
  clamped into ``[min_steps, max_steps]`` when those knobs exclude 4.
* Bad input is refused before anything is printed, with one line on stderr,
  ``replay: TRACE:LINE: reason``, and exit status 2 (``trace.TraceError``). Bad knobs and
  an unreadable file also exit 2.
* ``sglang_adaptive`` routes each round by that round's batch size; ``adaedl`` needs a
  ``draft_entropy`` list (``drafted`` values) on every line of a round view.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterator, List, Optional

import torch

from .config import DSDEConfig, DSDEConfigError, knob_help, knob_names, knob_type
from .core import PolicyDriver
from .core.round_cost import catch_up_tokens, round_sample
from .trace import RoundLine, RoundTrace, Trace, TraceError, read_trace

#: The closed loop's cost model when ``--cost`` is not given.
DEFAULT_CLOSED_LOOP_COST = "bs1-cpu"


def _decision_line(round_id: int, cap: int, requests: List[str], steps: List[int]) -> dict:
    return {"round": round_id, "cap": cap if cap >= 0 else None,
            "steps": {rid: s for rid, s in zip(requests, steps)}}


def run_rounds(view: RoundTrace, cfg: DSDEConfig, cost=None) -> Iterator[dict]:
    """Open loop over a round view: one output dict per round (the policy runs on CPU)."""
    driver = PolicyDriver.build(cfg, max_slots=max(1, view.max_slots), device="cpu")
    gaps = {}  # per request: tokens its draft has not seen (1 after its prefill)
    for batch in view.rounds:
        slots = torch.tensor([ln.slot for ln in batch], dtype=torch.int64)
        pending = catch_up_tokens(gaps.setdefault(ln.request, 1) for ln in batch)
        driver.observe_pending_catch_up(pending)
        driver.plan(slots, torch.tensor([_nan_if_none(ln.first_entropy) for ln in batch],
                                        dtype=torch.float64))
        width = max(ln.drafted for ln in batch)
        kl = torch.zeros(len(batch), width, dtype=torch.float64)
        entropy = None
        if all(ln.draft_entropy is not None for ln in batch):
            entropy = torch.zeros_like(kl)
        for i, ln in enumerate(batch):
            kl[i, :ln.drafted] = torch.tensor(ln.kl, dtype=torch.float64)
            if entropy is not None:
                entropy[i, :ln.drafted] = torch.tensor(ln.draft_entropy, dtype=torch.float64)
        if width == 0:  # an off round: nothing drafted (the engine's call)
            decision = driver.observe_off(slots)
        else:
            decision = driver.observe(
                slots, torch.tensor([ln.drafted for ln in batch]),
                torch.tensor([ln.accepted for ln in batch]), kl=kl,
                temperature=torch.tensor([ln.temperature for ln in batch],
                                         dtype=torch.float64),
                draft_entropy=entropy)
        verified = sum(ln.drafted for ln in batch)
        catch_up = pending if width > 0 else 0
        seconds = _round_seconds(batch, cost, width, verified, catch_up)
        if seconds is not None:
            driver.observe_cost(round_sample(len(batch), width, seconds, verified, catch_up))
        for ln in batch:
            gaps[ln.request] = 0 if width > 0 else gaps[ln.request] + 1
        yield _decision_line(batch[0].round, int(decision.cap), [ln.request for ln in batch],
                             decision.req_steps.tolist())
        done = [ln.slot for ln in batch if ln.done]
        if done:
            driver.release(torch.tensor(done, dtype=torch.int64))
            for ln in batch:
                if ln.done:
                    gaps.pop(ln.request, None)


def _nan_if_none(value: Optional[float]) -> float:
    return float("nan") if value is None else value


def _round_seconds(batch: List[RoundLine], cost, steps: int,
                   verified: int, catch_up: int = 0) -> Optional[float]:
    """The round's cost: measured on the lines, else modelled, else unknown."""
    measured = [ln.seconds for ln in batch if ln.seconds is not None]
    if measured:
        return max(measured)
    return cost.round(len(batch), steps, verified, catch_up) if cost is not None else None


def run_closed_loop(trace: Trace, cfg: DSDEConfig, cost, concurrency: int) -> List[dict]:
    """Closed loop over a trace: the simulator's decisions, one dict per round."""
    from .sim import PolicyController, simulate

    controller = PolicyController(cfg, max_slots=concurrency)
    simulate(trace.requests, controller, cost, concurrency=concurrency)
    return controller.decisions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_dsde.replay",
        description="Replay a trace (a round view open loop, a per-position trace closed "
                    "loop) through a speculation-length policy and print one JSON decision "
                    "line per round.")
    parser.add_argument("trace", help="JSONL trace file ('-' for stdin)")
    parser.add_argument("--cost", default=None,
                        help="cost model (sglang_dsde.sim.cost.cost_from_spec: file:PATH, "
                             "bs1-cpu, bs1-gpu-like, h100-llama3-8b, h100x4-llama3-70b); "
                             f"closed loop default {DEFAULT_CLOSED_LOOP_COST}")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="closed loop: requests running at once (default 1)")
    for name in knob_names():
        flags = ["--" + name.replace("_", "-"), "--dsde-" + name.replace("_", "-")]
        kind = knob_type(name)
        help_text = knob_help(name).replace("%", "%%")
        if name == "initial_steps":
            help_text += " In the replay the default is 4 (clamped into the SL range)."
        if name == "policy":
            help_text += " In the replay the default is dsde (the paper's policy)."
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif kind is tuple:
            parser.add_argument(*flags, dest=name, type=int, nargs="+", default=None,
                                help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=kind, default=None, help=help_text)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k in knob_names() and v is not None}
    overrides.setdefault("policy", "dsde")
    try:
        DSDEConfig(**overrides)
        if args.concurrency < 1:
            raise DSDEConfigError(f"--concurrency = {args.concurrency}: expected an integer "
                                  ">= 1")
    except DSDEConfigError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    try:
        source = sys.stdin.read().split("\n") if args.trace == "-" else args.trace
        trace = read_trace(source, need_entropy=overrides["policy"] == "adaedl")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"replay: cannot read {args.trace}: {exc}", file=sys.stderr)
        return 2
    except TraceError as exc:
        where = f"{args.trace}:{exc.lineno}: " if exc.lineno else f"{args.trace}: "
        print(f"replay: {where}{exc.reason}", file=sys.stderr)
        return 2
    try:
        if isinstance(trace, Trace):  # a closed loop drafts at most what the trace holds
            overrides.setdefault("max_steps", trace.max_steps)
            if overrides["max_steps"] > trace.max_steps:
                raise DSDEConfigError(f"--max-steps = {overrides['max_steps']}: the trace "
                                      f"holds {trace.max_steps} draft positions")
        cfg = DSDEConfig(**overrides)
        cost = _cost(args.cost, trace)
    except (DSDEConfigError, ValueError, OSError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    if isinstance(trace, Trace):
        decisions = run_closed_loop(trace, cfg, cost, args.concurrency)
    else:
        decisions = run_rounds(trace, cfg, cost)
    out = sys.stdout
    for decision in decisions:
        out.write(json.dumps(decision) + "\n")
    out.flush()
    return 0


def _cost(spec: Optional[str], trace):
    from .sim.cost import cost_from_spec, default_context

    if spec is None and isinstance(trace, RoundTrace):
        return None
    context = default_context(trace.requests) if isinstance(trace, Trace) else 1024.0
    try:
        return cost_from_spec(spec or DEFAULT_CLOSED_LOOP_COST, context=context)
    except (ValueError, OSError, KeyError) as exc:
        raise ValueError(f"--cost {spec}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
