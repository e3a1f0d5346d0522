"""Cost models: the NNLS fit recovers known parameters; the roofline model's arithmetic."""

import json

import numpy as np
import pytest

from sglang_dsde.core.round_cost import ROUND_COEFS
from sglang_dsde.sim import BS1_CPU, LinearRoundCost, fit_linear_cost, gpu_preset, load_cost
from sglang_dsde.sim.cost import nnls
from sglang_dsde.sim.gpu_cost import H100_SXM, LLAMA3_8B, LLAMA32_1B, forward_seconds

TRUE = LinearRoundCost(d0=7e-3, d1=1.5e-3, v0=28e-3, v1=2.5e-3, e0=4e-3, e1=0.8e-3,
                       p0=5e-3, p1=0.3e-3)
GRID = [(bs, k) for bs in (1, 2, 4, 8) for k in (0, 1, 2, 4, 8)]


def test_fit_recovers_exact_parameters():
    samples = [(bs, k, TRUE.round(bs, k)) for bs, k in GRID]
    prefills = [(n, TRUE.prefill(n)) for n in (64, 128, 256)]
    fit = fit_linear_cost(samples, prefills)
    for key in ROUND_COEFS + ("p0", "p1"):
        assert getattr(fit, key) == pytest.approx(getattr(TRUE, key), rel=1e-6, abs=1e-12), key
    assert fit.extra["rel_rms"] < 1e-9


def test_fit_with_noise_predicts_rounds_within_a_few_percent():
    rng = np.random.default_rng(0)
    samples = [(bs, k, TRUE.round(bs, k) * rng.uniform(0.95, 1.05))
               for bs, k in GRID for _ in range(3)]
    fit = fit_linear_cost(samples)
    for bs, k in GRID:
        assert fit.round(bs, k) == pytest.approx(TRUE.round(bs, k), rel=0.05)
    assert min(getattr(fit, key) for key in ROUND_COEFS) >= 0


def test_nnls_clamps_a_negative_direction_to_zero():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([1.0, -1.0, 0.0])
    x = nnls(a, b)
    assert x[1] == 0.0 and x[0] == pytest.approx(0.5)


def test_bs1_preset_is_its_formula():
    # k * d + 1 + v1 * k in decode steps, d 0.19, v1 0.21
    for k in range(6):
        assert BS1_CPU.round(1, k) == pytest.approx(k * 0.19 + 1 + 0.21 * k)


def test_roofline_decode_is_weight_streaming_and_large_batches_turn_compute_bound():
    # batch 1 decode of an 8B BF16 model: its 15.0 GB of matmul weights (the untied input
    # embedding is gathered, not streamed) at 0.8 x 3.35 TB/s, plus the overhead
    t = forward_seconds(H100_SXM, LLAMA3_8B, 1, 1, 0.0)
    assert t == pytest.approx((8.03e9 - 128256 * 4096) * 2 / (3.35e12 * 0.8) + 0.25e-3)
    cost = gpu_preset("h100-llama3-8b", context=1024)
    assert cost.round(1, 4) / cost.round(1, 0) == pytest.approx(
        1 + (4 * forward_seconds(H100_SXM, LLAMA32_1B, 1, 1, 1024)
             + forward_seconds(H100_SXM, LLAMA32_1B, 5, 1, 1024)) / cost.round(1, 0), rel=0.02)
    # 64 x 9 verify tokens: 2 * 7.5e9 * 576 FLOP is compute-bound on H100
    flops_time = 2 * 7.5e9 * 576 / (989e12 * 0.6)
    assert cost.round(64, 8) > flops_time
    assert all(cost.round(bs, k + 1) >= cost.round(bs, k) for bs in (1, 8, 64) for k in range(9))


def test_cost_models_round_trip_through_json(tmp_path):
    for model in (TRUE, gpu_preset("h100x4-llama3-70b", 700)):
        path = tmp_path / f"{model.name}.json"
        path.write_text(json.dumps(model.to_json()))
        loaded = load_cost(path)
        assert loaded.round(8, 3) == pytest.approx(model.round(8, 3))
        assert loaded.prefill(100) == pytest.approx(model.prefill(100))
