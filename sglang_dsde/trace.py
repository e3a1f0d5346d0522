"""Traces: one format for the simulator and the replay, one reader, one writer.

**The trace** (per position). At temperature 0 speculative decoding is lossless: the
output is the target's greedy continuation whatever the policy does, so only *where
rounds start* depends on the policy. A trace therefore stores, per request and per output
position ``t`` (``t`` tokens already generated, context = prompt + output[:t]):

* ``accept[t]``: how many of the draft's greedy tokens, drafted from that context, match
  ``output[t:t + max_steps]`` consecutively (0 .. ``min(max_steps, n - t)``);
* ``kl[t][j]``: KL(p_target || q_draft) at draft position ``j < max_steps`` of a round
  starting at ``t``, exactly as the engine's verify pass sees it (target row ``j`` comes
  from a target forward over the draft's own chain; ``sglang_dsde.core.kl``, raw logits);
* ``draft_entropy[t][j]``: the draft distribution's entropy there (``adaedl``; its
  ``[t][0]`` is the first-draft entropy ``goodput`` reads).

File (JSONL, ``TRACE_FORMAT`` version ``TRACE_VERSION``): line 1 is a header object; every
further line is one request::

    {"format": "sglang-dsde-trace", "version": 1, "max_steps": 8, "max_new_tokens": 64,
     "temperature": 0.0, "target": "...", "draft": "...", "workload": "chat", "seed": 0,
     "stop_at_eos": true, ...}
    {"id": "chat-0003", "source": "sharegpt", "prompt_ids": [...], "output_ids": [...],
     "accept": [n ints], "kl": [n lists of max_steps floats],
     "draft_entropy": [n lists], "verify_disagree": 0}

``n = len(output_ids) >= 1``. Floats are written with 6 significant digits. A truncated
last line (an interrupted recording) is ignored on read and cut off on resume.
``check_request`` validates shapes and ranges. In exact arithmetic a greedy trace also
satisfies ``accept[t] = min(max_steps, run of a[t], a[t+1], ... )`` with ``a[t] =
accept[t] > 0``; ``run_violations`` counts the positions where float noise at a near-tie
broke it (reported, not refused).

**The round view** (per verify round) is what a schedule makes of a trace: which requests
verified together, what each drafted and accepted, the KL of its drafted positions. The
simulator derives it from a trace (``sim.simulate`` logs it); the replay reads it. One
JSONL line per (verify round, request), rounds non-decreasing, the lines of one round one
batch (docs/algorithm.md, "Policy replay")::

    {"round": 12, "request": "a", "drafted": 4, "accepted": 2,
     "kl": [0.01, 0.2, 1.7, 0.9], "temperature": 0.0, "done": false}

Optional keys: ``draft_entropy`` (``drafted`` values; required by ``adaedl``),
``first_entropy`` (the first draft distribution's entropy, read by ``goodput``) and
``seconds`` (the round's measured time, the same on every line of a round). Unknown keys
are ignored, blank lines skipped, ``request`` is a string or an integer.

``read_trace(source)`` reads either (a header on the first line means a trace); every
error is one ``TraceError`` line ``SOURCE:LINE: reason``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

TRACE_FORMAT = "sglang-dsde-trace"
TRACE_VERSION = 1
#: Header keys that must match for a recording to resume into an existing file.
RESUME_KEYS = ("format", "version", "max_steps", "max_new_tokens", "temperature", "target",
               "draft", "workload", "seed", "stop_at_eos")


class TraceError(ValueError):
    """A trace that does not follow its format: one line, ``SOURCE:LINE: reason``."""

    def __init__(self, reason: str, *, source: Optional[str] = None,
                 lineno: Optional[int] = None):
        self.reason, self.source, self.lineno = reason, source, lineno
        where = "" if source is None else (f"{source}:{lineno}: " if lineno else f"{source}: ")
        super().__init__(where + reason)


@dataclass
class RequestTrace:
    """One request of a trace (arrays, not lists: the simulator indexes them per round)."""

    id: str
    #: ``[n]`` int64, 0 .. min(max_steps, n - t).
    accept: np.ndarray
    #: ``[n, max_steps]`` float32.
    kl: np.ndarray
    #: ``[n, max_steps]`` float32 or None when not recorded.
    draft_entropy: Optional[np.ndarray] = None
    prompt_len: int = 0
    source: str = ""
    prompt_ids: List[int] = field(default_factory=list)
    output_ids: List[int] = field(default_factory=list)
    verify_disagree: int = 0

    @property
    def num_tokens(self) -> int:
        """Output tokens of the request (``n``)."""
        return int(self.accept.shape[0])

    @property
    def max_steps(self) -> int:
        return int(self.kl.shape[1])

    def to_json(self) -> dict:
        out = {"id": self.id, "source": self.source, "prompt_len": self.prompt_len,
               "prompt_ids": list(map(int, self.prompt_ids)),
               "output_ids": list(map(int, self.output_ids)),
               "accept": self.accept.astype(int).tolist(), "kl": _round_rows(self.kl)}
        if self.draft_entropy is not None:
            out["draft_entropy"] = _round_rows(self.draft_entropy)
        out["verify_disagree"] = int(self.verify_disagree)
        return out

    @classmethod
    def from_json(cls, obj: dict) -> "RequestTrace":
        try:
            accept = np.asarray(obj["accept"], dtype=np.int64)
            kl = np.asarray(obj["kl"], dtype=np.float32)
            ent = obj.get("draft_entropy")
            ent = None if ent is None else np.asarray(ent, dtype=np.float32)
            prompt_ids = list(obj.get("prompt_ids", []))
            return cls(id=str(obj["id"]), accept=accept, kl=kl, draft_entropy=ent,
                       prompt_len=int(obj.get("prompt_len", len(prompt_ids))),
                       source=str(obj.get("source", "")), prompt_ids=prompt_ids,
                       output_ids=list(obj.get("output_ids", [])),
                       verify_disagree=int(obj.get("verify_disagree", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceError(f"bad request line: {exc}") from None


def _round_rows(values: np.ndarray) -> List[List[float]]:
    return [[float(f"{v:.6g}") for v in row] for row in np.asarray(values, dtype=np.float64)]


def check_request(req: RequestTrace, max_steps: int) -> None:
    """Raise ``TraceError`` unless ``req`` is a consistent greedy request trace."""
    n = req.num_tokens
    if n < 1:
        raise TraceError(f"request {req.id}: no output token")
    if req.kl.shape != (n, max_steps):
        raise TraceError(f"request {req.id}: kl has shape {req.kl.shape}, expected "
                               f"({n}, {max_steps})")
    if req.draft_entropy is not None and req.draft_entropy.shape != (n, max_steps):
        raise TraceError(f"request {req.id}: draft_entropy shape {req.draft_entropy.shape}")
    if not np.all(np.isfinite(req.kl)) or np.any(req.kl < 0):
        raise TraceError(f"request {req.id}: kl must be finite and >= 0")
    limit = np.minimum(max_steps, n - np.arange(n))
    if np.any(req.accept < 0) or np.any(req.accept > limit):
        bad = int(np.flatnonzero((req.accept < 0) | (req.accept > limit))[0])
        raise TraceError(f"request {req.id}: accept[{bad}] = {req.accept[bad]} outside "
                               f"[0, min(max_steps, n - t) = {limit[bad]}]")


def run_violations(req: RequestTrace) -> int:
    """Positions whose ``accept`` is not the agreement run there (0 in exact arithmetic)."""
    return int(np.sum(runs_to_accept(req.accept > 0, req.max_steps) != req.accept))


def runs_to_accept(agree: np.ndarray, max_steps: int) -> np.ndarray:
    """``accept[t] = min(max_steps, length of the run of True starting at t)`` (``[n]``)."""
    agree = np.asarray(agree, dtype=bool)
    accept = np.zeros(agree.shape[0], dtype=np.int64)
    run = 0
    for t in range(agree.shape[0] - 1, -1, -1):
        run = run + 1 if agree[t] else 0
        accept[t] = min(run, max_steps)
    return accept


@dataclass
class Trace:
    """A header and its requests, in file order."""

    header: dict
    requests: List[RequestTrace]

    @property
    def max_steps(self) -> int:
        return int(self.header["max_steps"])


def make_header(*, max_steps: int, max_new_tokens: int, target: str, draft: str,
                workload: str, seed: int, stop_at_eos: bool, **extra) -> dict:
    """A version-1 header; ``extra`` keys (documentation only) are kept as they are."""
    return {"format": TRACE_FORMAT, "version": TRACE_VERSION, "max_steps": int(max_steps),
            "max_new_tokens": int(max_new_tokens), "temperature": 0.0, "target": str(target),
            "draft": str(draft), "workload": str(workload), "seed": int(seed),
            "stop_at_eos": bool(stop_at_eos), **extra}


def _check_header(header: object, source: str) -> dict:
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise TraceError(f"line 1 is not a {TRACE_FORMAT} header", source=source)
    if header.get("version") != TRACE_VERSION:
        raise TraceError(f"trace version {header.get('version')!r}; this reader knows "
                         f"version {TRACE_VERSION}", source=source)
    return header


def _complete_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, text) of newline-terminated, non-blank lines."""
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.endswith("\n") and line.strip():
                yield lineno, line


# -- the round view ----------------------------------------------------------------------


@dataclass
class RoundLine:
    """One request's part of one verify round (module docstring, "round view")."""

    lineno: int
    round: int
    request: str
    drafted: int
    accepted: int
    kl: List[float]
    temperature: float = 0.0
    done: bool = False
    draft_entropy: Optional[List[float]] = None
    first_entropy: Optional[float] = None
    seconds: Optional[float] = None
    slot: int = -1


@dataclass
class RoundTrace:
    """A round view: its rounds (each a list of ``RoundLine``, one batch) and how many
    request slots they need at once (ids map to slots, reused after ``done``)."""

    rounds: List[List[RoundLine]]
    max_slots: int


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


def parse_round_line(obj: object, lineno: int, need_entropy: bool = False) -> RoundLine:
    """One round-view line (a decoded JSON value), validated; raises ``TraceError``."""
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
    if "draft_entropy" in obj or need_entropy:
        if "draft_entropy" not in obj:
            raise TraceError("missing field 'draft_entropy' (the adaedl policy needs it)")
        entropy = _number_list(obj, "draft_entropy", drafted)
    first = obj.get("first_entropy")
    seconds = obj.get("seconds")
    return RoundLine(lineno, rnd, str(request), drafted, accepted, kl, temperature, done,
                     entropy, None if first is None else _number("first_entropy", first),
                     None if seconds is None else _number("seconds", seconds))


def _read_rounds(numbered: Iterable[Tuple[int, str]], need_entropy: bool) -> RoundTrace:
    """Validate every line, group rounds and assign request slots."""
    rounds: List[List[RoundLine]] = []
    live: Dict[str, int] = {}   # request id -> slot
    free: List[int] = []
    max_slots = 0
    finishing: List[str] = []
    in_round: set = set()       # request ids of the current round
    for lineno, text in numbered:
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
            line = parse_round_line(obj, lineno, need_entropy)
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
    return RoundTrace(rounds, max_slots)


def round_line_json(*, round: int, request: str, drafted: int, accepted: int, kl,
                    temperature: float = 0.0, done: bool = False, draft_entropy=None,
                    first_entropy: Optional[float] = None,
                    seconds: Optional[float] = None) -> str:
    """One round-view line (the writer of the format ``parse_round_line`` reads)."""
    obj = {"round": int(round), "request": request, "drafted": int(drafted),
           "accepted": int(accepted), "kl": [float(x) for x in kl],
           "temperature": float(temperature), "done": bool(done)}
    if draft_entropy is not None:
        obj["draft_entropy"] = [float(x) for x in draft_entropy]
    if first_entropy is not None:
        obj["first_entropy"] = float(first_entropy)
    if seconds is not None:
        obj["seconds"] = float(seconds)
    return json.dumps(obj)


# -- the one reader ----------------------------------------------------------------------


def read_trace(source, *, check: bool = True,
               need_entropy: bool = False) -> Union[Trace, RoundTrace]:
    """Read a trace (header first) or a round view from a file path or a list of lines.

    A trace's truncated last line (an interrupted recording) is ignored; ``check``
    validates every request (``check_request``). A round view is validated line by line
    (``need_entropy``: every line must carry ``draft_entropy``). Errors: ``TraceError``
    (``SOURCE:LINE: reason``; the source is the path, absent for a list of lines).
    """
    if isinstance(source, (str, Path)):
        where = str(source)
        with open(source, "r", encoding="utf-8") as f:
            text = f.read()
        pieces = text.split("\n")
        # Only newline-terminated lines of a trace count; a round view counts them all.
        numbered = list(enumerate(pieces, 1))
        complete = numbered[:-1]
    else:
        where = None
        numbered = list(enumerate((str(t).rstrip("\n") for t in source), 1))
        complete = numbered
    numbered = [(n, t) for n, t in numbered if t.strip()]
    if not numbered:
        raise TraceError("empty trace", source=where)
    try:
        first = json.loads(numbered[0][1])
    except json.JSONDecodeError:
        first = None
    if isinstance(first, dict) and "format" in first:
        return _read_positions([(n, t) for n, t in complete if t.strip()], where, check)
    try:
        return _read_rounds(numbered, need_entropy)
    except TraceError as exc:
        raise TraceError(exc.reason, source=where, lineno=exc.lineno) from None


def _read_positions(numbered: List[Tuple[int, str]], where: Optional[str],
                    check: bool) -> Trace:
    header = _check_header(json.loads(numbered[0][1]), where or "trace")
    requests, seen = [], set()
    for lineno, text in numbered[1:]:
        try:
            try:
                req = RequestTrace.from_json(json.loads(text))
            except json.JSONDecodeError as exc:
                raise TraceError(f"malformed JSON: {exc.msg}") from None
            if req.id in seen:
                raise TraceError(f"request {req.id!r} appears twice")
            seen.add(req.id)
            if check:
                check_request(req, int(header["max_steps"]))
        except TraceError as exc:
            raise TraceError(exc.reason, source=where, lineno=lineno) from None
        requests.append(req)
    return Trace(header, requests)


class TraceWriter:
    """Append requests to a trace file, resuming an earlier recording with the same header.

    ``done_ids`` lists the requests already in the file; a truncated last line is cut off.
    A file whose header differs in a ``RESUME_KEYS`` key is refused (record elsewhere).
    """

    def __init__(self, path, header: dict):
        self.path = Path(path)
        self.done_ids: set = set()
        if self.path.exists() and self.path.stat().st_size > 0:
            self._resume(header)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(header) + "\n", encoding="utf-8")

    def _resume(self, header: dict) -> None:
        raw = self.path.read_bytes()
        keep = raw.rfind(b"\n") + 1
        if keep < len(raw):  # an interrupted write: drop the partial line
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        old = _check_header(json.loads(raw[:raw.index(b"\n")]), str(self.path))
        diff = [k for k in RESUME_KEYS if old.get(k) != header.get(k)]
        if diff:
            raise TraceError(f"{self.path}: exists with a different {', '.join(diff)} "
                                   f"(remove it or record to another file)")
        for _, text in _complete_lines(self.path):
            obj = json.loads(text)
            if "format" not in obj:
                self.done_ids.add(str(obj["id"]))

    def append(self, req: RequestTrace) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(req.to_json(), separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done_ids.add(req.id)


def synthetic_request(req_id: str, agree: Iterable[bool], max_steps: int, *,
                      kl_agree: float = 0.05, kl_disagree: float = 2.0,
                      prompt_len: int = 16) -> RequestTrace:
    """A consistent request from a per-position agreement vector (for tests and demos).

    ``kl[t][j]`` is ``kl_agree`` where the draft's token ``j`` of a round at ``t`` agrees
    (``j < accept[t]``) and ``kl_disagree`` elsewhere; entropy mirrors it.
    """
    agree = np.asarray(list(agree), dtype=bool)
    accept = runs_to_accept(agree, max_steps)
    j = np.arange(max_steps)[None, :]
    kl = np.where(j < accept[:, None], kl_agree, kl_disagree).astype(np.float32)
    return RequestTrace(id=req_id, accept=accept, kl=kl, draft_entropy=kl.copy(),
                        prompt_len=prompt_len, source="synthetic")


def synthetic_trace(num_requests: int, num_tokens: int, max_steps: int, agree_prob: float,
                    seed: int = 0, **kw) -> Trace:
    """Requests with i.i.d. per-position agreement (probability ``agree_prob``), seeded."""
    rng = np.random.default_rng(seed)
    reqs = [synthetic_request(f"syn-{i:04d}", rng.random(num_tokens) < agree_prob, max_steps,
                              **kw) for i in range(num_requests)]
    header = make_header(max_steps=max_steps, max_new_tokens=num_tokens, target="synthetic",
                         draft=f"iid-agree-{agree_prob}", workload="synthetic", seed=seed,
                         stop_at_eos=False)
    return Trace(header, reqs)


def trace_summary(trace: Trace) -> Dict[str, float]:
    """Per-position agreement rate, mean accept (at every position), tokens, requests."""
    accept = np.concatenate([r.accept for r in trace.requests])
    kl = np.concatenate([r.kl[:, 0] for r in trace.requests])
    return {"num_requests": len(trace.requests), "num_tokens": int(accept.shape[0]),
            "agreement": float(np.mean(accept > 0)), "mean_accept": float(np.mean(accept)),
            "mean_kl_first": float(np.mean(kl)),
            "verify_disagree": int(sum(r.verify_disagree for r in trace.requests)),
            "run_violations": int(sum(run_violations(r) for r in trace.requests))}
