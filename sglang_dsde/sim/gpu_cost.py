"""A roofline round-cost model for a Llama-3 8B / 70B-class target with a ~1B draft on H100.

No GPU measurement backs it (this project has none): every forward is costed by roofline
arithmetic from public specifications, with the efficiency factors and per-forward
overheads stated as assumptions (docs/simulator.md discusses them)::

    forward(model, tokens, bs) = overhead + tp_sync
        + max(bytes / (mem_bw * bw_eff), flops / (peak_flops * flops_eff))
    bytes = weight_bytes / tp + kv_bytes_per_token * bs * context / tp
    flops = (2 * matmul_params * tokens + 4 * layers * q_dim * context * tokens) / tp
    weight_bytes = 2 * matmul_params; matmul_params = params - untied input embedding
    (an untied embedding table is only gathered, never streamed whole)
    tp_sync = 2 * layers * allreduce_s   (tp > 1: two all-reduces per layer)

    round(bs, k, T, g) = k * forward(draft, bs) + forward(target, bs + T)
                      + [k > 0] * forward(draft, bs * (k + 1))  # draft extend
                      + [k > 0 and g > 0] * forward(draft, g)   # catch-up extend
    (T: drafted tokens the target verifies; bs * k when every request verifies k)
    prefill(n)   = forward(target, n) + forward(draft, n)       (context 0: attention
                                                                 of a prefill ignored)

``context`` is a fixed per-request context length (a model parameter: the simulator CLI
sets it to the workload's mean prompt + half its output), so the cost depends on
``(bs, k)`` only and is non-decreasing in k, as the oracle bound needs.

Sources of the constants:

* H100 SXM5 80 GB: 989 TFLOP/s dense BF16 tensor (NVIDIA H100 datasheet: 1,979 with
  2:4 sparsity), 3.35 TB/s HBM3 (same datasheet). Efficiencies (assumptions): 0.8 of HBM
  bandwidth for weight streaming at small batch, 0.6 of dense peak for the GEMMs of
  verify/prefill (about 600 TFLOP/s, typical of large BF16 GEMMs on H100).
* Llama-3-8B: 8.03e9 parameters, 32 layers, 32 query heads x 128, 8 KV heads x 128,
  vocabulary 128256 x 4096 untied (0.525e9 embedding parameters) (Meta's config.json);
  Llama-3-70B: 70.6e9, 80 layers, 64 x 128 query, 8 KV heads x 128, untied 128256 x 8192
  (1.05e9); Llama-3.2-1B: 1.24e9, 16 layers, 32 x 64 query, 8 KV heads x 64, tied
  embeddings (the LM head streams the table). BF16: 2 bytes each.
* Per-forward overhead (assumption): 0.25 ms for the target, 0.10 ms for the draft
  (CUDA-graph replay, sampling, scheduler bookkeeping of one engine step); all-reduce
  latency 12 us per call over NVLink for the small decode activations (assumption).
* 70B target: tensor parallel 4 (141 GB of BF16 weights need >= 2 H100s; 4 leave KV room);
  the draft runs in the same TP group (SGLang's STANDALONE draft shares the target's TP).

The grid of resulting round costs is tabulated in docs/simulator.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..core.round_cost import CostModel


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops: float        # dense BF16 FLOP/s
    mem_bw: float            # bytes/s
    flops_eff: float = 0.6
    bw_eff: float = 0.8
    allreduce_s: float = 12e-6
    source: str = ""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_params: float
    num_layers: int
    q_dim: int               # query heads x head dim
    kv_dim: int              # KV heads x head dim
    overhead_s: float
    #: Parameters of an untied input embedding (gathered, not streamed); 0 when tied.
    embed_params: float = 0.0
    bytes_per_param: float = 2.0
    source: str = ""

    @property
    def matmul_params(self) -> float:
        return self.num_params - self.embed_params

    @property
    def weight_bytes(self) -> float:
        return self.matmul_params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.num_layers * self.kv_dim * self.bytes_per_param  # K and V


H100_SXM = GPUSpec("H100-SXM5-80GB", peak_flops=989e12, mem_bw=3.35e12,
                   source="NVIDIA H100 datasheet (SXM5): 989 TFLOP/s dense BF16, 3.35 TB/s")
LLAMA3_8B = ModelSpec("Llama-3-8B", 8.03e9, 32, 32 * 128, 8 * 128, overhead_s=0.25e-3,
                      embed_params=128256 * 4096,
                      source="meta-llama/Meta-Llama-3-8B config.json")
LLAMA3_70B = ModelSpec("Llama-3-70B", 70.6e9, 80, 64 * 128, 8 * 128, overhead_s=0.25e-3,
                       embed_params=128256 * 8192,
                       source="meta-llama/Meta-Llama-3-70B config.json")
LLAMA32_1B = ModelSpec("Llama-3.2-1B", 1.24e9, 16, 32 * 64, 8 * 64, overhead_s=0.10e-3,
                       source="meta-llama/Llama-3.2-1B config.json")


def forward_seconds(gpu: GPUSpec, model: ModelSpec, num_tokens: int, batch_size: int,
                    context: float, tp: int = 1) -> float:
    """Roofline time of one forward of ``num_tokens`` tokens for ``batch_size`` requests
    of ``context`` cached tokens each (module docstring)."""
    bytes_moved = (model.weight_bytes + model.kv_bytes_per_token * batch_size * context) / tp
    flops = (2 * model.matmul_params * num_tokens
             + 4 * model.num_layers * model.q_dim * context * num_tokens) / tp
    body = max(bytes_moved / (gpu.mem_bw * gpu.bw_eff), flops / (gpu.peak_flops * gpu.flops_eff))
    sync = 2 * model.num_layers * gpu.allreduce_s if tp > 1 else 0.0
    return model.overhead_s + sync + body


@dataclass(frozen=True)
class RooflineRoundCost(CostModel):
    """``RoundCost`` from roofline forwards (module docstring); unit: seconds."""

    gpu: GPUSpec
    target: ModelSpec
    draft: ModelSpec
    context: float = 1024.0
    tp: int = 1
    kind = "roofline"

    def _fwd(self, model: ModelSpec, num_tokens: int, batch_size: int, context: float) -> float:
        return forward_seconds(self.gpu, model, num_tokens, batch_size, context, self.tp)

    def round(self, batch_size: int, batch_steps: int, verified: Optional[int] = None,
              catch_up: float = 0.0) -> float:
        bs, k, ctx = batch_size, batch_steps, self.context
        verified = bs * k if verified is None else verified
        cost = self._fwd(self.target, bs + verified, bs, ctx)
        if k > 0:
            cost += k * self._fwd(self.draft, bs, bs, ctx)
            cost += self._fwd(self.draft, bs * (k + 1), bs, ctx)
            if catch_up > 0:
                cost += self._fwd(self.draft, int(catch_up), bs, ctx)
        return cost

    def prefill(self, num_tokens: int) -> float:
        return (self._fwd(self.target, num_tokens, 1, 0.0)
                + self._fwd(self.draft, num_tokens, 1, 0.0))

    @classmethod
    def from_json(cls, obj: dict) -> "RooflineRoundCost":
        rest = {k: v for k, v in obj.items() if k not in ("gpu", "target", "draft", "kind")}
        return cls(gpu=GPUSpec(**obj["gpu"]), target=ModelSpec(**obj["target"]),
                   draft=ModelSpec(**obj["draft"]), **rest)


ROOFLINE_SOURCE = "roofline arithmetic (sglang_dsde/sim/gpu_cost.py)"


def gpu_preset(name: str, context: float = 1024.0) -> RooflineRoundCost:
    """``h100-llama3-8b`` (TP 1) or ``h100x4-llama3-70b`` (TP 4), both with Llama-3.2-1B."""
    if name == "h100-llama3-8b":
        return RooflineRoundCost(H100_SXM, LLAMA3_8B, LLAMA32_1B, context, 1, name=name,
                                 source=ROOFLINE_SOURCE)
    if name == "h100x4-llama3-70b":
        return RooflineRoundCost(H100_SXM, LLAMA3_70B, LLAMA32_1B, context, 4, name=name,
                                 source=ROOFLINE_SOURCE)
    raise ValueError(f"unknown GPU cost preset {name!r}; known: {', '.join(GPU_PRESETS)}")


GPU_PRESETS = ("h100-llama3-8b", "h100x4-llama3-70b")
