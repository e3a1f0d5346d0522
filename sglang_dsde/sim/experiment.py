"""One simulation cell: every contender and the oracle on one trace, cost model and
concurrency, as table rows (``report``). Used by bench/simulate.py and the tests."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .contenders import Contender, build_controller
from .cost import RoundCost
from .oracle import oracle_bound
from .report import add_ratios, oracle_row, result_row
from .simulator import SimResult, simulate
from ..trace import RequestTrace


def run_cell(requests: Sequence[RequestTrace], contenders: Sequence[Contender],
             cost: RoundCost, *, concurrency: int, max_steps: int, cell: Dict[str, object],
             log_steps: bool = False, with_oracle: bool = True,
             progress: Optional[Callable[[str], None]] = None
             ) -> Tuple[List[dict], Dict[str, SimResult]]:
    """Rows (ratios filled) and the raw ``SimResult`` of each contender, by label."""
    rows, results = [], {}
    cell = dict(cell, concurrency=concurrency, unit=cost.unit)
    for c in contenders:
        controller = build_controller(c, max_steps=max_steps, max_slots=concurrency,
                                      cost=cost)
        res = simulate(requests, controller, cost, concurrency=concurrency,
                       log_steps=log_steps, name=c.label)
        results[c.label] = res
        rows.append(result_row(res, **cell))
        if progress:
            progress(c.label)
    if with_oracle:
        ragged = any(getattr(build_controller(c, max_steps=max_steps, max_slots=1, cost=cost),
                             "ragged", False) for c in contenders)
        bound = oracle_bound(requests, cost, concurrency=concurrency, max_steps=max_steps,
                             ragged=ragged)
        rows.append(oracle_row(bound, requests, **cell))
    add_ratios(rows, cell_keys=tuple(k for k in cell if k != "unit"))
    return rows, results


def static_accept_lengths(requests: Sequence[RequestTrace], *, max_steps: int,
                          concurrency: int, cost: RoundCost) -> Dict[int, float]:
    """``{k: simulated accept length of static SL k}`` for k in 1..max_steps: the figures
    the engine's ``avg_spec_accept_length`` is validated against (within 5%)."""
    from .contenders import parse_contender

    out = {}
    for k in range(1, max_steps + 1):
        rows, _ = run_cell(requests, [parse_contender(f"static:{k}")], cost,
                           concurrency=concurrency, max_steps=max_steps, cell={},
                           with_oracle=False)
        out[k] = rows[0]["accept_length"]
    return out
