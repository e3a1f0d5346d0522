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


def test_default_floor_above_max_steps_blames_the_knob_the_user_set(plugins_loaded, tiny_pair):
    """``--dsde-policy dsde`` floors the SL at 2 by default: with ``--dsde-max-steps 1`` the
    message names --dsde-max-steps (given), not --dsde-min-steps (never passed)."""
    with pytest.raises(DSDEConfigError) as excinfo:
        resolve(tiny_pair, "--dsde-policy", "dsde", "--dsde-max-steps", "1")
    text = str(excinfo.value)
    assert text.startswith("--dsde-max-steps (DSDE knob 'max_steps') = 1: expected an integer "
                           "in [2, 32] with --dsde-policy dsde"), text
    assert "default of --dsde-min-steps" in text and "\n" not in text


def test_initial_steps_zero_is_honoured(plugins_loaded, tiny_pair):
    """An initial SL of 0 starts requests in SGLang's no-drafting state; SGLang's own
    static state keeps one step (it must draft)."""
    server_args = resolve(tiny_pair, "--dsde-policy", "static", "--dsde-initial-steps", "0")
    resolved = server_args.resolved_dict()
    assert (resolved["speculative_num_steps"], resolved["speculative_num_draft_tokens"]) == (1, 2)
    cfg = dsde_config_of(server_args)
    from sglang_dsde.args import initial_steps_of

    assert cfg.initial_steps == 0 and initial_steps_of(server_args, cfg) == 0


@pytest.mark.parametrize("extra,message", [
    (["--dsde-initial-steps", "3", "--speculative-num-steps", "2"],
     "--dsde-initial-steps = 3 and --speculative-num-steps = 2: both set the SL of a new "
     "request with DSDE; give one of them"),
    (["--dsde-policy", "dsde", "--dsde-min-steps", "0", "--dsde-initial-steps", "0"],
     "--dsde-initial-steps = 0: with --dsde-policy dsde expected an integer in "
     "[max(1, min_steps)=1, max_steps=10]"),
    (["--dsde-policy", "dsde", "--dsde-initial-steps", "1"],
     "(min_steps is 2, the default of --dsde-min-steps for --dsde-policy dsde)"),
])
def test_initial_steps_conflicts_are_refused(plugins_loaded, tiny_pair, extra, message):
    with pytest.raises(DSDEConfigError) as excinfo:
        resolve(tiny_pair, *extra)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def _resolve_with_draft(tiny_pair, draft):
    return resolve((tiny_pair[0], str(draft)))


def test_draft_path_that_does_not_exist_is_refused_naming_the_flag(plugins_loaded, tiny_pair,
                                                                   tmp_path):
    missing = tmp_path / "no-such-draft"
    with pytest.raises(DSDEConfigError) as excinfo:
        _resolve_with_draft(tiny_pair, missing)
    assert str(excinfo.value) == (f"--speculative-draft-model-path = '{missing}': no such "
                                  f"directory (expected the folder of a draft model sharing "
                                  f"the target's vocabulary)")


def test_draft_with_another_vocabulary_is_refused_before_weights_load(plugins_loaded, tiny_pair,
                                                                      tmp_path):
    from tools.testing import make_tiny_llama

    other = make_tiny_llama(tmp_path / "vocab400", num_layers=1, vocab=400, seed=1)
    with pytest.raises(DSDEConfigError) as excinfo:
        _resolve_with_draft(tiny_pair, other)
    text = str(excinfo.value)
    assert text.startswith(f"--speculative-draft-model-path = '{other}': vocab_size ")
    assert "the target's (--model-path) is" in text and "\n" not in text


def test_draft_whose_tokenizer_maps_ids_differently_is_refused(plugins_loaded, tiny_pair,
                                                               tmp_path):
    """Same vocab_size, two tokens swapped: SGLang would load both models to find out."""
    import shutil

    draft = tmp_path / "swapped"
    shutil.copytree(tiny_pair[1], draft)
    spec = json.loads((draft / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (draft / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DSDEConfigError, match="its tokenizer maps 2 token\(s\) to other ids"):
        _resolve_with_draft(tiny_pair, draft)


#: What SGLang refuses with its own runtime-state switching (--speculative-adaptive),
#: refused with DSDE at argument resolution: (arguments, environment, the flag named).
SWITCH_INCOMPATIBLE = [
    (["--enable-lora"], {}, "--enable-lora = True"),
    (["--lora-paths", "adapter=/nonexistent"], {}, "--lora-paths = ['adapter=/nonexistent']"),
    (["--enable-hisparse"], {}, "--enable-hisparse = True"),
    (["--enable-two-batch-overlap"], {}, "--enable-two-batch-overlap = True"),
    (["--enable-pdmux"], {}, "--enable-pdmux = True"),
    ([], {"SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND": "1"},
     "SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND = '1'"),
]


@pytest.mark.parametrize("extra,env,named", SWITCH_INCOMPATIBLE,
                         ids=[n.split(" =")[0] for _, _, n in SWITCH_INCOMPATIBLE])
def test_what_runtime_state_switches_break_is_refused_naming_the_flag(
        plugins_loaded, tiny_pair, monkeypatch, extra, env, named):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DSDEConfigError) as excinfo:
        resolve(tiny_pair, *extra)
    text = str(excinfo.value)
    assert text.startswith(named) and "DSDE" in text and "\n" not in text


def test_state_steps_flag_resolves_to_the_runtime_states(plugins_loaded, tiny_pair):
    cfg = dsde_config_of(resolve(tiny_pair, "--dsde-state-steps", "0", "2", "5",
                                 "--dsde-max-steps", "8"))
    assert cfg.state_steps == (0, 2, 5)
    with pytest.raises(DSDEConfigError,
                       match=r"--dsde-state-steps \(DSDE knob 'state_steps'\) = \[0, 9\]"):
        resolve(tiny_pair, "--dsde-state-steps", "0", "9", "--dsde-max-steps", "8")
