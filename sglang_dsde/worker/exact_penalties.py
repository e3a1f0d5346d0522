"""Penalised requests verify one token per round, so their output is the plain server's.

Read against SGLang 0.5.23. On the speculative path the penalties are "relaxed"
(``speculative/eagle_utils.py``): once per round ``eagle_prepare_for_decode`` feeds only
each request's *last* output token to the penalizers, and ``eagle_sample`` adds the
resulting per-request penalties to every verify row alike. Row 0 (the distribution after
the committed tokens) is therefore exact when the previous round committed one token, and
rows 1.. are not: a drafted token does not yet count against its successors. For
``repetition_penalty``, ``frequency_penalty``, ``presence_penalty`` and an unmet
``min_new_tokens`` (whose EOS mask lifts mid-round in a plain decode) the committed tokens
then differ from a plain server's.

The lossless way without per-position penalties: such a request accepts no draft. Its
chain is cut after node 0 (``retrieve_next_token[b, 0] = -1``, the same cut as
``--dsde-per-request-cut``; both verify branches walk it), so each round commits the one
token drawn from row 0, whose penalties then count every earlier output token: exactly
what a plain decode step computes. Other requests of the batch are unaffected. The cost:
a penalised request advances one token per round, whatever it drafted.
"""

from __future__ import annotations

from typing import List


def needs_exact_penalties(req) -> bool:
    """Whether a request's sampling parameters are penalised position by position."""
    params = req.sampling_params
    return bool(params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                or params.presence_penalty != 0.0
                or params.min_new_tokens > len(req.output_ids))


def penalised_rows(reqs) -> List[int]:
    return [row for row, req in enumerate(reqs) if needs_exact_penalties(req)]


def cut_penalised_chains(batch) -> int:
    """Cut the verify chain of every penalised request of ``batch`` after node 0; return
    how many were cut."""
    rows = penalised_rows(batch.reqs)
    if rows:
        next_token = batch.spec_info.retrieve_next_token
        next_token[rows, 0] = -1
    return len(rows)
