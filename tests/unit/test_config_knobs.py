"""DSDEConfig: defaults from docs/algorithm.md, validation, JSON sources (pure, no SGLang)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from sglang_dsde.config import (
    DSDEConfig,
    DSDEConfigError,
    knob_flag,
    knob_help,
    knob_names,
    knob_type,
    parse_knob_text,
    state_steps_for,
)


def test_defaults_are_the_papers():
    cfg = DSDEConfig(policy="dsde")
    assert (cfg.window, cfg.decay, cfg.alpha) == (30, 0.9, 2.0)
    assert (cfg.min_steps, cfg.max_steps, cfg.batch_cap) == (2, 10, True)
    assert (cfg.kmax_kl_weight, cfg.kmin_fraction) == (0.5, 0.1)
    assert cfg.per_request_cut is False


def test_default_policy_is_goodput_whose_floor_is_zero():
    """The bench winner is the default (docs/goodput.md); the paper's floor of 2 stays
    with the paper's policy unless min_steps is given."""
    assert (DSDEConfig().policy, DSDEConfig().min_steps) == ("goodput", 0)
    assert DSDEConfig(policy="adaedl").min_steps == 2
    assert DSDEConfig(policy="dsde", min_steps=1).min_steps == 1
    assert DSDEConfig.from_mapping({"policy": "dsde"}).min_steps == 2


def test_config_is_frozen_and_replace_validates():
    cfg = DSDEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 3
    assert cfg.replace(window=3).window == 3
    with pytest.raises(DSDEConfigError):
        cfg.replace(window=-1)


@pytest.mark.parametrize("changes,expected", [
    ({"window": 0}, "--dsde-window (DSDE knob 'window') = 0: expected an integer in [1, 1024]"),
    ({"window": 2.5}, "= 2.5: expected an integer"),
    ({"decay": 0.0}, "(0.0, 1.0]"),
    ({"decay": 1.0000001}, "(0.0, 1.0]"),
    ({"alpha": math.inf}, "--dsde-alpha"),
    ({"min_steps": 4, "max_steps": 3}, "= 4: expected an integer in [0, max_steps=3]"),
    ({"max_steps": 33}, "[1, 32]"),
    ({"policy": "dsde", "initial_steps": 1},
     "expected an integer in [min_steps=2, max_steps=10] (or none)"),
    ({"policy": "greedy"}, "expected one of dsde, static"),
    ({"batch_cap": "yes"}, "expected true or false"),
    ({"kmin_fraction": True}, "--dsde-kmin-fraction"),
    ({"state_steps": [0, 11]}, "--dsde-state-steps (DSDE knob 'state_steps') = [0, 11]: "
     "expected distinct integers in [min_steps=0, max_steps=10] (or none)"),
    ({"policy": "dsde", "state_steps": [1, 2]}, "in [min_steps=2, max_steps=10]"),
    ({"state_steps": [2, 2]}, "expected distinct integers"),
    ({"state_steps": []}, "expected distinct integers"),
    ({"state_steps": 4}, "expected distinct integers"),
])
def test_each_bad_value_is_one_line_naming_knob_value_and_range(changes, expected):
    with pytest.raises(DSDEConfigError) as excinfo:
        DSDEConfig(**changes)
    assert expected in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_boundaries_are_accepted():
    DSDEConfig(window=1, decay=1.0, min_steps=0, max_steps=1, kmin_fraction=0.0)
    DSDEConfig(window=1024, min_steps=32, max_steps=32, initial_steps=32)


def test_json_inline_file_and_errors(tmp_path):
    assert DSDEConfig.from_json_source(None) == DSDEConfig()
    assert DSDEConfig.from_json_source('  {"window": 8} ').window == 8
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"decay": 0.5, "batch_cap": False}))
    cfg = DSDEConfig.from_json_source(str(path))
    assert (cfg.decay, cfg.batch_cap) == (0.5, False)
    for text, fragment in [('{"window": }', "malformed JSON: Expecting value at line 1 column 12"),
                           ('{"wndow": 3}', "unknown knob 'wndow'"),
                           (str(tmp_path / "none.json"), "no such file")]:
        with pytest.raises(DSDEConfigError, match="DSDE config") as excinfo:
            DSDEConfig.from_json_source(text)
        assert fragment in str(excinfo.value)
    path.write_text("[1, 2]")
    with pytest.raises(DSDEConfigError, match="expected a JSON object, got list"):
        DSDEConfig.from_json_source(str(path))


def test_every_knob_has_flag_help_and_type():
    for name in knob_names():
        assert knob_flag(name).startswith("--dsde-") and "_" not in knob_flag(name)
        assert "Default:" in knob_help(name) and "allowed:" in knob_help(name)
        assert knob_type(name) in (int, float, bool, str, tuple)


def test_readme_knob_table_is_current():
    """docs/knobs.md shows the table ``python -m sglang_dsde.config`` prints; regenerate on
    change."""
    from pathlib import Path

    from sglang_dsde.config import knob_table_markdown

    readme = (Path(__file__).resolve().parents[2] / "docs" / "knobs.md").read_text()
    assert knob_table_markdown() in readme


def test_state_steps_default_to_at_most_seven_states_covering_the_range():
    """One runtime state (CUDA graphs, attention backends) per value: a small set."""
    assert DSDEConfig().state_steps == (0, 1, 2, 3, 4, 6, 10)
    assert DSDEConfig(policy="dsde").state_steps == (2, 3, 4, 6, 10)
    for lo in range(0, 4):
        for hi in range(max(lo, 1), 11):
            steps = DSDEConfig(min_steps=lo, max_steps=hi).state_steps
            assert steps[0] == lo and steps[-1] == hi and len(steps) <= 7
            assert list(steps) == sorted(set(steps))
    assert DSDEConfig(max_steps=32).state_steps == (0, 1, 2, 3, 4, 6, 10, 16, 24, 32)
    assert DSDEConfig(state_steps=[6, 0, 2]).state_steps == (0, 2, 6)  # sorted
    # A derived set follows a new range; a given one is kept.
    assert DSDEConfig().replace(max_steps=5).state_steps == (0, 1, 2, 3, 4, 5)
    assert DSDEConfig(state_steps=[0, 3]).replace(window=4).state_steps == (0, 3)


def test_the_initial_sl_always_has_a_state():
    """SGLang builds --speculative-num-steps's state at start-up: it is runnable too."""
    assert state_steps_for(DSDEConfig(), 5) == (0, 1, 2, 3, 4, 5, 6, 10)
    assert state_steps_for(DSDEConfig(), 4) == DSDEConfig().state_steps


def test_list_knob_text():
    assert parse_knob_text("state_steps", "0,1, 2 8") == (0, 1, 2, 8)
    assert parse_knob_text("window", "12") == 12 and parse_knob_text("batch_cap", "no") is False
    with pytest.raises(DSDEConfigError, match="--dsde-state-steps = 'a b'"):
        parse_knob_text("state_steps", "a b")
    assert DSDEConfig.from_json_source('{"state_steps": [0, 4]}').state_steps == (0, 4)
