"""Weighted variance, WVIR and the slot-indexed KL ring buffer."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsde_reference import wvir as reference_wvir
from sglang_dsde.core.numerics import ceil_tol, neumaier_add_columns
from sglang_dsde.core.state import KLHistory
from sglang_dsde.core.wvir import decay_weights, weighted_variance, wvir

CPU = torch.device("cpu")


def test_weighted_variance_matches_float64_numpy_on_random_values():
    rng = np.random.default_rng(0)
    values = rng.exponential(0.7, size=(50, 30))
    weights = 0.9 ** rng.integers(0, 30, size=(50, 30))
    weights[:, 25:] = 0.0
    got = weighted_variance(torch.from_numpy(values), torch.from_numpy(weights)).numpy()
    for row in range(50):
        want = np.cov(values[row, :25], aweights=weights[row, :25], bias=True)
        assert np.isfinite(got[row])
        assert got[row] == pytest.approx(float(want), rel=1e-12, abs=1e-15)


def test_wvir_by_hand():
    """History oldest -> newest [0.5, 0.5, 0.5, 0.75, 0.5, 0.75], decay 0.5.

    Newest first x = [0.75, 0.5, 0.75, 0.5, 0.5, 0.5], w = [1, .5, .25, .125, .0625, .03125].
    Short window = newest 6 // 3 = 2: m = (0.75 + 0.25) / 1.5 = 2/3,
      var = (1 * (1/12)^2 + 0.5 * (1/6)^2) / 1.5 = 1/72.
    Long: sum w = 1.96875, sum w x = 1.296875, sum w x^2 = 0.8828125,
      var = 0.8828125 / 1.96875 - (1.296875 / 1.96875)^2 = 0.014487...
    WVIR = (1/72) / 0.014487 = 0.958696 (= 0.9586956521739...).
    """
    hist = [0.5, 0.5, 0.5, 0.75, 0.5, 0.75]
    values = torch.tensor([hist[::-1]], dtype=torch.float64)  # column c = age c
    age = torch.arange(6).unsqueeze(0)
    got = wvir(values, age, torch.tensor([6]), decay_weights(0.5, 6, CPU)).item()
    assert got == pytest.approx(0.9586956521739131, rel=1e-12)
    assert got == pytest.approx(reference_wvir(hist, 0.5), rel=1e-12)


@pytest.mark.parametrize("hist,want", [
    ([], 0.0), ([3.0], 0.0),               # n < 2 -> 0 (even though wvar(long) is 0)
    ([0.2, 0.2, 0.2, 0.2], 20.0),          # flat -> wvar(long) < 1e-6 -> 20
    ([0.2, 0.2005, 0.2], 20.0),            # wvar(long) ~ 5e-8 < 1e-6 -> 20
    ([1.0, 0.0], 0.0),                     # short = newest max(1, 2 // 3) = 1 value: var 0
])
def test_wvir_edge_cases(hist, want):
    window = 8
    values = torch.zeros(1, window, dtype=torch.float64)
    values[0, :len(hist)] = torch.tensor(hist[::-1], dtype=torch.float64)
    age = torch.arange(window).unsqueeze(0)
    got = wvir(values, age, torch.tensor([len(hist)]), decay_weights(0.9, window, CPU)).item()
    assert got == want == reference_wvir(hist, 0.9)


def test_ring_buffer_wraps_keeps_last_window_and_counts_tokens():
    hist = KLHistory(max_slots=4, window=5, device=CPU)
    slots = torch.tensor([2, 0])
    kl = torch.tensor([[1., 2., 3., 4., 5., 6., 7.], [9., 8., 0., 0., 0., 0., 0.]],
                      dtype=torch.float64)
    seen = hist.append(slots, kl, torch.tensor([7, 2]))
    assert seen.tolist() == [7, 2]
    seen = hist.append(slots, torch.tensor([[8.], [7.]], dtype=torch.float64),
                       torch.tensor([1, 1]))
    assert seen.tolist() == [8, 3] and hist.n_seen.tolist() == [3, 0, 8, 0]

    def newest_first(slot, n_seen):
        age, count = hist.ages(torch.tensor([n_seen]))
        row = hist.values[slot, :5]
        return [row[c].item() for a in range(count.item()) for c in range(5) if age[0, c] == a]

    assert newest_first(2, 8) == [8., 7., 6., 5., 4.]
    assert newest_first(0, 3) == [7., 8., 9.]
    hist.reset(torch.tensor([2]))
    assert hist.n_seen.tolist() == [3, 0, 0, 0] and (hist.values[2] == 0).all()


def test_ceil_tolerance_and_half_even_round():
    x = torch.tensor([2.0, 2.0000000001, 1.9999999999, 2.000001, 7.000000000000001,
                      0.7 * 10, -0.4], dtype=torch.float64)
    assert ceil_tol(x).tolist() == [2.0, 2.0, 2.0, 3.0, 7.0, 7.0, 0.0]
    halves = torch.tensor([0.5, 1.5, 2.5, 4.5, 7.5], dtype=torch.float64)
    assert torch.round(halves).tolist() == [round(v) for v in halves.tolist()] == [0, 2, 2, 4, 8]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=3, max_size=3),
                min_size=1, max_size=12))
def test_neumaier_columns_equal_python312_sum(rows):
    from dsde_reference import py_sum

    total = torch.zeros(1, dtype=torch.float64)
    comp = torch.zeros(1, dtype=torch.float64)
    for row in rows:
        total, comp = neumaier_add_columns(total, comp, torch.tensor([row], dtype=torch.float64))
    flat = [v for row in rows for v in row]
    assert (total + comp).item() == py_sum(flat)
