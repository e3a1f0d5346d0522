"""bench/micro_policy.py runs through one small row for each timed policy (its rounds are
the policy's real calls, so a changed signature breaks the bench here, not in a session
that has a GPU for an hour)."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import micro_policy  # noqa: E402


@pytest.mark.parametrize("policy", ["dsde", "goodput"])
def test_one_small_row_on_the_cpu(policy, tmp_path):
    row = dict(bs=2, vocab=512, width=3)
    micro_policy.measure_row(row, torch.device("cpu"), repeats=2, stack=None, policy=policy)
    for key in ("signal_update_ms", "update_only_ms", "off_round_ms"):
        assert row[key] > 0, key
    micro_policy.write_results(tmp_path, torch.device("cpu"), dict(
        device="cpu", torch=torch.__version__, repeats=2, logits_dtype="float32",
        policy=policy), [row], quiet=True)
    table = next(tmp_path.glob("micro_policy_cpu*.md")).read_text()
    assert "off_round_ms" in table and "| 2 | 512 | 3 |" in table
