"""The runtime states a DSDE server builds: which CUDA-graph batch sizes each captures,
and an estimate of what each costs in GPU memory (pure; the worker logs it at start-up).

SGLang switches speculation lengths between pre-built ``SpecRuntimeState``s, one per
step count (``config.state_steps_for``): each captures target-verify, draft-decode and
draft-extend CUDA graphs over its batch sizes and brings its own attention backends.

Batch sizes per state (``graph_batch_sizes``): a state of ``s`` steps verifies
``s + 1`` tokens per request; it captures the batch sizes whose verify holds at most
``GRAPH_TOKEN_FACTOR`` x the largest graph batch size in tokens, i.e. no state's largest
verify graph is wider than the one-step state's. Long chains at large batches run
without a graph (eagerly; the goodput policy's cost model learns what they cost), as
with SGLang's adaptive tiers (``adaptive_spec_params.py``: bs 1 {1,3,5,7}, bs 8 {0,1,3},
bs 32 {0,1}, bs 64 {0}). The smallest batch size is always kept.

Memory per state (``estimate_state_bytes``), counted from what stays allocated once the
graphs are captured (their temporaries share SGLang's global graph memory pool): the
logits each captured target-verify graph keeps as its output (float32, ``bs * (s + 1)``
rows), the draft-extend graph's (``bs`` rows), and a new target attention workspace per
state (FlashInfer: ``SGLANG_FLASHINFER_WORKSPACE_SIZE``, 384 MiB by default; other
backends: small index buffers, not counted). SGLang logs the measured figure per state
("Built adaptive runtime state steps=...: mem=...GB").
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

#: A state captures batch sizes up to this many times the largest graph batch size in
#: verify tokens (2: the one-step state's largest verify).
GRAPH_TOKEN_FACTOR = 2
#: SGLang 0.5.23's default FlashInfer workspace (``SGLANG_FLASHINFER_WORKSPACE_SIZE``).
FLASHINFER_WORKSPACE_BYTES = 384 * 1024 * 1024
LOGITS_BYTES = 4  # float32


def graph_batch_sizes(graph_bs: Optional[Sequence[int]], steps: int) -> Optional[List[int]]:
    """The CUDA-graph batch sizes a state of ``steps`` steps captures (None: no graphs)."""
    if graph_bs is None:
        return None
    sizes = sorted(graph_bs)
    if not sizes:
        return []
    budget = GRAPH_TOKEN_FACTOR * sizes[-1]
    return [bs for bs in sizes if bs * (steps + 1) <= budget] or sizes[:1]


def workspace_bytes(attention_backend: Optional[str]) -> int:
    """The attention workspace a new target backend allocates per state."""
    if attention_backend and "flashinfer" in attention_backend:
        return int(os.environ.get("SGLANG_FLASHINFER_WORKSPACE_SIZE",
                                  FLASHINFER_WORKSPACE_BYTES))
    return 0


def estimate_state_bytes(steps: int, graph_bs: Optional[Sequence[int]], vocab_size: int,
                         attention_backend: Optional[str], *, pruned: bool = True
                         ) -> Dict[str, int]:
    """``{"graphs": ..., "workspace": ...}`` bytes one state keeps (module docstring);
    ``pruned=False``: a state captured over every graph batch size (SGLang's start-up
    state, built before the adaptive states)."""
    sizes = (graph_batch_sizes(graph_bs, steps) if pruned else graph_bs) or []
    verify_rows = sum(bs * (steps + 1) for bs in sizes)
    extend_rows = sum(sizes)
    return {"graphs": (verify_rows + extend_rows) * vocab_size * LOGITS_BYTES,
            "workspace": workspace_bytes(attention_backend)}


def describe_states(steps: Sequence[int], graph_bs: Optional[Sequence[int]], vocab_size: int,
                    attention_backend: Optional[str], initial_steps: int) -> str:
    """The start-up log line: the states, their graph batch sizes and estimated memory
    (``initial_steps``: the state SGLang builds first, over every graph batch size)."""
    mib = 1024 * 1024
    parts, total = [], 0
    for s in steps:
        if s == initial_steps:
            continue
        est = estimate_state_bytes(s, graph_bs, vocab_size, attention_backend)
        total += sum(est.values())
        sizes = graph_batch_sizes(graph_bs, s)
        where = f"graphs bs<={max(sizes)}" if sizes else "no graphs"
        parts.append(f"{s}: {where}, ~{sum(est.values()) / mib:.0f} MiB")
    return (f"DSDE: {len(steps)} runtime states (steps {' '.join(map(str, steps))}; "
            f"{initial_steps} is the start-up state STANDALONE builds too); estimated "
            f"memory of the others (graph outputs + target attention workspace): "
            f"{'; '.join(parts) or 'none'}; total ~{total / mib / 1024:.2f} GiB (SGLang "
            f"logs the measured figure as it builds each state)")
