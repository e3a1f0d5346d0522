"""Trace-driven, closed-loop simulation of speculation-length policies (torch/numpy only).

Modules (docs/simulator.md has the semantics, the trace format and the cost constants):

* ``record``: record a request's trace (``sglang_dsde.trace``) from a target/draft pair.
* ``cost``: the world models by name (the core's ``LinearRoundCost``, batch-1 presets,
  JSON files); ``gpu_cost``: the H100 roofline model; ``measure``: the CPU prior from HF
  forwards.
* ``controllers``: a core policy (the engine's objects) or hindsight picks each round's SL.
* ``simulator``: the closed-loop batch scheduler; ``oracle``: the per-request DP and
  the throughput upper bound; ``contenders``: spec strings; ``experiment``: one cell;
  ``report``: result rows, ratios, markdown/JSON tables.

No SGLang import anywhere in this package.
"""

from ..core.round_cost import LinearRoundCost
from ..trace import RequestTrace, Trace, TraceWriter, read_trace, synthetic_trace
from .contenders import Contender, build_controller, parse_contender, parse_contenders
from .controllers import HindsightGreedyController, PolicyController
from .cost import BS1_CPU, BS1_GPU_LIKE, cost_from_spec, fit_linear_cost, load_cost
from .experiment import run_cell
from .gpu_cost import GPU_PRESETS, RooflineRoundCost, gpu_preset
from .oracle import oracle_bound, request_dp
from .simulator import SimResult, simulate

__all__ = ["BS1_CPU", "BS1_GPU_LIKE", "Contender", "GPU_PRESETS", "HindsightGreedyController",
           "LinearRoundCost", "PolicyController", "RequestTrace", "RooflineRoundCost",
           "SimResult", "Trace", "TraceWriter", "build_controller", "cost_from_spec",
           "fit_linear_cost", "gpu_preset", "load_cost", "oracle_bound", "parse_contender",
           "parse_contenders", "read_trace", "request_dp", "run_cell", "simulate",
           "synthetic_trace"]
