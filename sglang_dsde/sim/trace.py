"""Acceptance/KL traces: the data that replays any speculation-length policy exactly.

At temperature 0 speculative decoding is lossless: the output is the target's greedy
continuation whatever the policy does, so only *where rounds start* depends on the policy.
A trace therefore stores, per request and per output position ``t`` (``t`` tokens already
generated, context = prompt + output[:t]):

* ``accept[t]``: how many of the draft's greedy tokens, drafted from that context, match
  ``output[t:t + max_steps]`` consecutively (0 .. ``min(max_steps, n - t)``);
* ``kl[t][j]``: KL(p_target || q_draft) at draft position ``j < max_steps`` of a round
  starting at ``t``, exactly as the engine's verify pass sees it (target row ``j`` comes
  from a target forward over the draft's own chain; ``sglang_dsde.core.kl``, raw logits);
* ``draft_entropy[t][j]``: the draft distribution's entropy there (for ``adaedl``).

File format (JSONL, ``TRACE_FORMAT`` version ``TRACE_VERSION``): line 1 is a header
object; every further line is one request::

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
accept[t] > 0`` (the draft's chain stays on the output while it agrees, so its token ``j``
is its own greedy token at ``t + j``); ``run_violations`` counts the positions where float
noise at a near-tie broke it (reported, not refused).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

TRACE_FORMAT = "sglang-dsde-trace"
TRACE_VERSION = 1
#: Header keys that must match for a recording to resume into an existing file.
RESUME_KEYS = ("format", "version", "max_steps", "max_new_tokens", "temperature", "target",
               "draft", "workload", "seed", "stop_at_eos")


class TraceFormatError(ValueError):
    """A trace file that does not follow the format (one-line reason)."""


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
            raise TraceFormatError(f"bad request line: {exc}") from None


def _round_rows(values: np.ndarray) -> List[List[float]]:
    return [[float(f"{v:.6g}") for v in row] for row in np.asarray(values, dtype=np.float64)]


def check_request(req: RequestTrace, max_steps: int) -> None:
    """Raise ``TraceFormatError`` unless ``req`` is a consistent greedy request trace."""
    n = req.num_tokens
    if n < 1:
        raise TraceFormatError(f"request {req.id}: no output token")
    if req.kl.shape != (n, max_steps):
        raise TraceFormatError(f"request {req.id}: kl has shape {req.kl.shape}, expected "
                               f"({n}, {max_steps})")
    if req.draft_entropy is not None and req.draft_entropy.shape != (n, max_steps):
        raise TraceFormatError(f"request {req.id}: draft_entropy shape {req.draft_entropy.shape}")
    if not np.all(np.isfinite(req.kl)) or np.any(req.kl < 0):
        raise TraceFormatError(f"request {req.id}: kl must be finite and >= 0")
    limit = np.minimum(max_steps, n - np.arange(n))
    if np.any(req.accept < 0) or np.any(req.accept > limit):
        bad = int(np.flatnonzero((req.accept < 0) | (req.accept > limit))[0])
        raise TraceFormatError(f"request {req.id}: accept[{bad}] = {req.accept[bad]} outside "
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


def _check_header(header: object, where: str) -> dict:
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise TraceFormatError(f"{where}: line 1 is not a {TRACE_FORMAT} header")
    if header.get("version") != TRACE_VERSION:
        raise TraceFormatError(f"{where}: trace version {header.get('version')!r}; this "
                               f"reader knows version {TRACE_VERSION}")
    return header


def _complete_lines(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, text) of newline-terminated, non-blank lines."""
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.endswith("\n") and line.strip():
                yield lineno, line


def read_trace(path, *, check: bool = True) -> Trace:
    """Load a trace file (``check``: validate every request with ``check_request``)."""
    path = Path(path)
    lines = _complete_lines(path)
    try:
        _, first = next(lines)
    except StopIteration:
        raise TraceFormatError(f"{path}: empty trace") from None
    header = _check_header(json.loads(first), str(path))
    requests, seen = [], set()
    for lineno, text in lines:
        try:
            req = RequestTrace.from_json(json.loads(text))
        except (json.JSONDecodeError, TraceFormatError) as exc:
            raise TraceFormatError(f"{path}:{lineno}: {exc}") from None
        if req.id in seen:
            raise TraceFormatError(f"{path}:{lineno}: request {req.id!r} appears twice")
        seen.add(req.id)
        if check:
            try:
                check_request(req, int(header["max_steps"]))
            except TraceFormatError as exc:
                raise TraceFormatError(f"{path}:{lineno}: {exc}") from None
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
            raise TraceFormatError(f"{self.path}: exists with a different {', '.join(diff)} "
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
