"""Policy replay: run a speculation-length policy over a recorded trace, print decisions.

Usage::

    python -m sglang_dsde.replay TRACE.jsonl [--policy P] [--window N] [--decay X] ...

Knob flags are generated from ``DSDEConfig``'s fields (``--window``, ``--batch-cap`` /
``--no-batch-cap``, ...; the plugin's ``--dsde-`` spelling is accepted too). The trace is
JSONL, one line per (verify round, request), rounds non-decreasing, the lines of one round
being one batch (dsde-algorithm.md, "Policy replay")::

    {"round": 12, "request": "a", "drafted": 4, "accepted": 2,
     "kl": [0.01, 0.2, 1.7, 0.9], "temperature": 0.0, "done": false}

Output: one JSON line per round, ``{"round": 12, "cap": 5, "steps": {"a": 5, "b": 3}}``,
``cap`` null when no request of the round is past warm-up (or capping is off, or the
policy has no cap).

Decisions where the format leaves room (documented here, tested in tests/unit):

* ``steps`` lists exactly the requests of that round's batch, in trace order, each with
  its SL for its next round; a request absent from the round keeps its state and is not
  listed. A request whose ``done`` is set is listed (it was in the batch; its SL is what
  the policy decided) and then forgotten: a later line with the same id is a new request.
* The initial SL is 4 unless ``--initial-steps`` is given, clamped into
  ``[min_steps, max_steps]`` when those knobs exclude 4.
* ``temperature`` may be omitted (0, greedy); ``done`` may be omitted (false); unknown
  keys are ignored; blank lines are skipped. ``request`` is a string or an integer (its
  decimal string names it in the output).
* Bad input is refused before anything is printed, with one line on stderr,
  ``replay: TRACE:LINE: reason``, and exit status 2: malformed JSON, a missing or
  mistyped field, a negative number, NaN or infinity, ``accepted > drafted``, a ``kl``
  list whose length is not ``drafted``, a round lower than the previous line's, or the
  same request twice in one round. Bad knobs and an unreadable file also exit 2.
* ``sglang_adaptive`` routes each round by that round's batch size; ``adaedl`` needs a
  ``draft_entropy`` list (``drafted`` values) on every line.

The decisions come from the same policy objects the engine uses (``core.make_policy``);
request ids are mapped to slots, reused after ``done``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import List, Optional

import torch

from .config import DSDEConfig, DSDEConfigError, knob_help, knob_names, knob_type
from .core import make_policy

#: Initial SL of a new request in the replay unless ``--initial-steps`` is given.
REPLAY_INITIAL_STEPS = 4


class TraceError(ValueError):
    """A bad trace line; ``str`` is the one-line reason (without file and line)."""


@dataclasses.dataclass
class TraceLine:
    lineno: int
    round: int
    request: str
    drafted: int
    accepted: int
    kl: List[float]
    temperature: float
    done: bool
    draft_entropy: Optional[List[float]]
    slot: int = -1


def _int_field(obj: dict, key: str) -> int:
    if key not in obj:
        raise TraceError(f"missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"field {key!r} = {value!r}: expected a non-negative integer")
    if value < 0:
        raise TraceError(f"field {key!r} = {value}: negative")
    return value


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(f"field {key!r} = {value!r}: expected a number")
    value = float(value)
    if math.isnan(value):
        raise TraceError(f"field {key!r}: NaN")
    if math.isinf(value):
        raise TraceError(f"field {key!r}: infinite")
    if value < 0:
        raise TraceError(f"field {key!r} = {value!r}: negative")
    return value


def _number_list(obj: dict, key: str, length: int) -> List[float]:
    values = obj[key]
    if not isinstance(values, list):
        raise TraceError(f"field {key!r}: expected a list of numbers")
    if len(values) != length:
        raise TraceError(f"field {key!r} has {len(values)} values; expected drafted = {length}")
    return [_number(f"{key}[{i}]", v) for i, v in enumerate(values)]


def parse_line(text: str, lineno: int, need_entropy: bool) -> TraceLine:
    """One trace line, validated; raises ``TraceError``."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise TraceError("expected a JSON object")
    rnd = _int_field(obj, "round")
    if "request" not in obj:
        raise TraceError("missing field 'request'")
    request = obj["request"]
    if isinstance(request, bool) or not isinstance(request, (str, int)):
        raise TraceError(f"field 'request' = {request!r}: expected a string")
    drafted = _int_field(obj, "drafted")
    accepted = _int_field(obj, "accepted")
    if accepted > drafted:
        raise TraceError(f"accepted = {accepted} exceeds drafted = {drafted}")
    if "kl" not in obj:
        raise TraceError("missing field 'kl'")
    kl = _number_list(obj, "kl", drafted)
    temperature = _number("temperature", obj.get("temperature", 0.0))
    done = obj.get("done", False)
    if not isinstance(done, bool):
        raise TraceError(f"field 'done' = {done!r}: expected true or false")
    entropy = None
    if need_entropy:
        if "draft_entropy" not in obj:
            raise TraceError("missing field 'draft_entropy' (the adaedl policy needs it)")
        entropy = _number_list(obj, "draft_entropy", drafted)
    return TraceLine(lineno, rnd, str(request), drafted, accepted, kl, temperature, done,
                     entropy)


def read_trace(lines, need_entropy: bool = False) -> tuple:
    """Validate every line and group rounds; assign request slots.

    Returns ``(rounds, max_slots)`` where ``rounds`` is a list of lists of ``TraceLine``.
    Raises ``TraceError`` with ``lineno`` set as attribute.
    """
    rounds: List[List[TraceLine]] = []
    live = {}           # request id -> slot
    free: List[int] = []
    max_slots = 0
    finishing: List[str] = []
    in_round = set()    # request ids of the current round
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            line = parse_line(text, lineno, need_entropy)
            if rounds and line.round < rounds[-1][0].round:
                raise TraceError(f"round {line.round} after round {rounds[-1][0].round}: "
                                 "rounds must be non-decreasing")
            if not rounds or line.round != rounds[-1][0].round:
                for rid in finishing:  # `done` requests are forgotten after their round
                    free.append(live.pop(rid))
                finishing = []
                in_round = set()
                rounds.append([])
            elif line.request in in_round:
                raise TraceError(f"request {line.request!r} appears twice in round {line.round}")
        except TraceError as exc:
            exc.lineno = lineno
            raise
        in_round.add(line.request)
        if line.request not in live:
            live[line.request] = free.pop() if free else max_slots
            max_slots = max(max_slots, live[line.request] + 1)
        line.slot = live[line.request]
        if line.done:
            finishing.append(line.request)
        rounds[-1].append(line)
    return rounds, max_slots


def run_rounds(rounds, max_slots: int, cfg: DSDEConfig):
    """Yield one output dict per round (the policy runs on CPU)."""
    policy = make_policy(cfg, max_slots=max(1, max_slots), device="cpu",
                         default_initial_steps=min(max(REPLAY_INITIAL_STEPS, cfg.min_steps),
                                                   cfg.max_steps))
    for batch in rounds:
        slots = torch.tensor([ln.slot for ln in batch], dtype=torch.int64)
        width = max(ln.drafted for ln in batch)
        kl = torch.zeros(len(batch), width, dtype=torch.float64)
        entropy = torch.zeros_like(kl) if policy.needs_draft_entropy else None
        for i, ln in enumerate(batch):
            kl[i, :ln.drafted] = torch.tensor(ln.kl, dtype=torch.float64)
            if entropy is not None:
                entropy[i, :ln.drafted] = torch.tensor(ln.draft_entropy, dtype=torch.float64)
        decision = policy.update(
            slots, torch.tensor([ln.drafted for ln in batch]),
            torch.tensor([ln.accepted for ln in batch]), req_kl=kl,
            req_temperature=torch.tensor([ln.temperature for ln in batch],
                                         dtype=torch.float64),
            req_draft_entropy=entropy)
        cap = int(decision.cap)
        steps = decision.req_steps.tolist()
        yield {"round": batch[0].round, "cap": cap if cap >= 0 else None,
               "steps": {ln.request: s for ln, s in zip(batch, steps)}}
        done = [ln.slot for ln in batch if ln.done]
        if done:
            policy.reset_slots(torch.tensor(done, dtype=torch.int64))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_dsde.replay",
        description="Replay a JSONL verify-round trace through a speculation-length policy "
                    "and print one JSON decision line per round.")
    parser.add_argument("trace", help="JSONL trace file ('-' for stdin)")
    for name in knob_names():
        flags = ["--" + name.replace("_", "-"), "--dsde-" + name.replace("_", "-")]
        kind = knob_type(name)
        help_text = knob_help(name).replace("%", "%%")
        if name == "initial_steps":
            help_text += f" In the replay the default is {REPLAY_INITIAL_STEPS}."
        if name == "policy":
            help_text += (" In the replay the default is dsde: a verify-round trace has no "
                          "round timings or first-draft entropies for goodput.")
        if kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=kind, default=None, help=help_text)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "trace" and v is not None}
    overrides.setdefault("policy", "dsde")
    try:
        cfg = DSDEConfig(**overrides)
    except DSDEConfigError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    try:
        if args.trace == "-":
            text = sys.stdin.read()
        else:
            with open(args.trace, encoding="utf-8") as fh:
                text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"replay: cannot read {args.trace}: {exc}", file=sys.stderr)
        return 2
    try:
        # Split on newlines only, so line numbers are what editors show.
        rounds, max_slots = read_trace(text.split("\n"),
                                       need_entropy=cfg.policy == "adaedl")
    except TraceError as exc:
        print(f"replay: {args.trace}:{exc.lineno}: {exc}", file=sys.stderr)
        return 2
    out = sys.stdout
    for decision in run_rounds(rounds, max_slots, cfg):
        out.write(json.dumps(decision) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
