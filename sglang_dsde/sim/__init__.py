"""Trace-driven, closed-loop simulation of speculation-length policies (torch/numpy only).

Modules (docs/simulator.md has the semantics, the trace format and the cost constants):

* ``trace``: the JSONL acceptance/KL trace format (read, resumable write, synthetic).
* ``record``: record a request's trace from a target/draft pair (HF-style models).
* ``cost``: round cost models (``LinearRoundCost``, NNLS fit, issue 8's presets);
  ``gpu_cost``: the H100 roofline model; ``measure``: the CPU prior from HF forwards.
* ``controllers``: a core policy (the engine's objects) or hindsight picks each round's SL.
* ``simulator``: the closed-loop batch scheduler; ``oracle``: the per-request DP and
  the throughput upper bound; ``contenders``: spec strings; ``experiment``: one cell;
  ``report``: result rows, ratios, markdown/JSON tables.

No SGLang import anywhere in this package.
"""

from .contenders import Contender, build_controller, parse_contender, parse_contenders
from .controllers import HindsightGreedyController, PolicyController
from .cost import ISSUE8_CPU, ISSUE8_GPU_LIKE, LinearRoundCost, fit_linear_cost, load_cost
from .experiment import run_cell
from .gpu_cost import GPU_PRESETS, RooflineRoundCost, gpu_preset
from .oracle import oracle_bound, request_dp
from .simulator import SimResult, simulate
from .trace import RequestTrace, Trace, TraceWriter, read_trace, synthetic_trace

__all__ = ["Contender", "GPU_PRESETS", "HindsightGreedyController", "ISSUE8_CPU",
           "ISSUE8_GPU_LIKE", "LinearRoundCost", "PolicyController", "RequestTrace",
           "RooflineRoundCost", "SimResult", "Trace", "TraceWriter", "build_controller",
           "fit_linear_cost", "gpu_preset", "load_cost", "oracle_bound", "parse_contender",
           "parse_contenders", "read_trace", "request_dp", "run_cell", "simulate",
           "synthetic_trace"]
