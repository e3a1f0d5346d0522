"""DSDE through SGLang's real argument pipeline: prepare_server_args + resolve_once.

Resolution reads model configs only (no weights), which is where a bad knob must fail.
"""

from __future__ import annotations

import json

import pytest

from sglang_dsde.args import dsde_config_of
from sglang_dsde.config import DSDEConfigError


def resolve(tiny_pair, *extra):
    from sglang.srt.server_args import prepare_server_args

    target, draft = tiny_pair
    server_args = prepare_server_args([
        "--model-path", target, "--speculative-algorithm", "DSDE",
        "--speculative-draft-model-path", draft, "--device", "cpu", *extra])
    server_args.resolve_once()
    return server_args


def test_defaults_resolve_to_a_topk1_chain(plugins_loaded, tiny_pair):
    resolved = resolve(tiny_pair).resolved_dict()
    assert resolved["speculative_algorithm"] == "DSDE"
    assert resolved["speculative_eagle_topk"] == 1
    assert resolved["speculative_num_steps"] == 4
    assert resolved["speculative_num_draft_tokens"] == 5
    # CPU: overlap scheduling stays on (SGLang turns it off for STANDALONE there;
    # patches/cpu_spec_overlap.py supplies what DSDE's relay needs).
    assert resolved["disable_overlap_schedule"] is False
    assert resolved["max_running_requests"] == 48
    assert resolved["enable_mixed_chunk"] is False


@pytest.mark.parametrize("steps", [2, 3, 7])
def test_draft_tokens_follow_steps(plugins_loaded, tiny_pair, steps):
    resolved = resolve(tiny_pair, "--speculative-num-steps", str(steps),
                       "--speculative-num-draft-tokens", "9").resolved_dict()
    assert resolved["speculative_eagle_topk"] == 1
    assert resolved["speculative_num_steps"] == steps
    assert resolved["speculative_num_draft_tokens"] == steps + 1


@pytest.mark.parametrize("max_steps", [10, 6])
def test_max_draft_tokens_cover_the_largest_window(plugins_loaded, tiny_pair, max_steps):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    server_args = resolve(tiny_pair, "--dsde-max-steps", str(max_steps))
    algo = SpeculativeAlgorithm.from_string("DSDE")
    # max_steps + 1 verified tokens, plus the aligned draft extend's one slot past them.
    assert algo.resolve_max_speculative_num_draft_tokens(server_args) == max_steps + 2


def test_knobs_from_flags_file_and_inline_json(plugins_loaded, tiny_pair, tmp_path):
    cfg_file = tmp_path / "dsde.json"
    cfg_file.write_text(json.dumps({"window": 40, "decay": 0.85}))
    cfg = dsde_config_of(resolve(tiny_pair, "--speculative-adaptive-config", str(cfg_file),
                                 "--dsde-window", "12", "--no-dsde-batch-cap"))
    assert (cfg.window, cfg.decay, cfg.batch_cap) == (12, 0.85, False)  # flags win
    cfg = dsde_config_of(resolve(tiny_pair, "--speculative-adaptive-config",
                                 '{"alpha": 1.5, "policy": "static"}'))
    assert (cfg.alpha, cfg.policy, cfg.window) == (1.5, "static", 30)


def test_engine_style_record(plugins_loaded, tiny_pair):
    """``sglang.Engine(**kwargs)`` builds the record directly: knobs go in the JSON field."""
    from sglang.srt.server_args import ServerArgs

    target, draft = tiny_pair
    server_args = ServerArgs(model_path=target, speculative_algorithm="dsde",
                             speculative_draft_model_path=draft, device="cpu",
                             speculative_adaptive_config='{"window": 7}')
    server_args.resolve_once()
    resolved = server_args.resolved_dict()
    assert resolved["speculative_num_draft_tokens"] == resolved["speculative_num_steps"] + 1
    assert dsde_config_of(server_args).window == 7


BAD_KNOBS = [
    (["--dsde-window", "0"], "--dsde-window (DSDE knob 'window') = 0: expected an integer in [1, 1024]"),
    (["--dsde-decay", "0"], "--dsde-decay (DSDE knob 'decay') = 0.0: expected a number in (0.0, 1.0]"),
    (["--dsde-decay", "1.5"], "--dsde-decay (DSDE knob 'decay') = 1.5: expected a number in (0.0, 1.0]"),
    (["--dsde-min-steps", "5", "--dsde-max-steps", "3"],
     "--dsde-min-steps (DSDE knob 'min_steps') = 5: expected an integer in [0, max_steps=3]"),
    (["--dsde-alpha", "nan"], "--dsde-alpha (DSDE knob 'alpha') = nan"),
    (["--speculative-adaptive-config", '{"windw": 3}'], "unknown knob 'windw'"),
    (["--speculative-adaptive-config", '{"window": 3,'], "malformed JSON"),
    (["--speculative-adaptive-config", '{"window": true}'],
     "--dsde-window (DSDE knob 'window') = True: expected an integer in [1, 1024]"),
    (["--speculative-num-steps", "12"],
     "--speculative-num-steps = 12: with DSDE expected an integer in [max(1, min_steps)=1, max_steps=10]"),
    (["--speculative-eagle-topk", "4"], "--speculative-eagle-topk = 4"),
]


@pytest.mark.parametrize("extra,message", BAD_KNOBS, ids=[" ".join(a) for a, _ in BAD_KNOBS])
def test_bad_knob_is_refused_with_one_line(plugins_loaded, tiny_pair, extra, message):
    with pytest.raises(DSDEConfigError) as excinfo:
        resolve(tiny_pair, *extra)
    text = str(excinfo.value)
    assert message in text
    assert "\n" not in text


def test_missing_config_file_is_refused(plugins_loaded, tiny_pair, tmp_path):
    with pytest.raises(DSDEConfigError, match="no such file"):
        resolve(tiny_pair, "--speculative-adaptive-config", str(tmp_path / "missing.json"))


def test_dsde_flags_need_the_dsde_algorithm(plugins_loaded, tiny_pair):
    from sglang.srt.server_args import prepare_server_args

    with pytest.raises(DSDEConfigError, match="--dsde-window: DSDE knobs need"):
        prepare_server_args(["--model-path", tiny_pair[0], "--dsde-window", "5"])


def test_draft_model_is_required(plugins_loaded, tiny_pair):
    from sglang.srt.server_args import prepare_server_args

    server_args = prepare_server_args(["--model-path", tiny_pair[0], "--device", "cpu",
                                       "--speculative-algorithm", "DSDE"])
    with pytest.raises(DSDEConfigError, match="--speculative-draft-model-path is required"):
        server_args.resolve_once()
