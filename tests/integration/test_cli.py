"""The launcher a user types, in real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys


def run_launcher(*args, env_extra=None, timeout=120):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_exits_zero_and_lists_the_dsde_knobs():
    result = run_launcher("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "DSDE speculative decoding (sglang-dsde plugin)" in result.stdout
    for flag in ("--dsde-window", "--dsde-decay", "--dsde-alpha", "--dsde-min-steps",
                 "--dsde-max-steps", "--dsde-batch-cap", "--dsde-policy"):
        assert flag in result.stdout, flag


def test_disabled_plugin_leaves_dsde_unknown_with_sglangs_message(tiny_pair):
    """SGLANG_PLUGINS whitelists plugins by name: without ours DSDE is SGLang's unknown name."""
    target, draft = tiny_pair
    result = run_launcher("--model-path", target, "--speculative-draft-model-path", draft,
                          "--speculative-algorithm", "DSDE", "--device", "cpu",
                          env_extra={"SGLANG_PLUGINS": "not_dsde"})
    assert result.returncode != 0
    assert "Unknown speculative algorithm name: DSDE" in result.stderr


def _cpu_env():
    return {"SGLANG_USE_CPU_ENGINE": "1"}


def test_a_refused_knob_is_one_line_without_traceback(tiny_pair):
    """The README's promise: a bad value stops the launcher with one line naming the flag,
    the value and the range, before any model loads."""
    target, draft = tiny_pair
    result = run_launcher("--model-path", target, "--speculative-draft-model-path", draft,
                          "--speculative-algorithm", "DSDE", "--device", "cpu",
                          "--dsde-policy", "dsde", "--dsde-max-steps", "1", env_extra=_cpu_env())
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "sglang-dsde: error:" in line]
    assert errors == ["sglang-dsde: error: --dsde-max-steps (DSDE knob 'max_steps') = 1: "
                      "expected an integer in [2, 32] with --dsde-policy dsde, whose smallest "
                      "speculation length is 2 (the default of --dsde-min-steps; set it to go "
                      "lower)"], result.stderr[-3000:]


def test_sglang_serve_refuses_a_missing_draft_in_one_line(tiny_pair, tmp_path):
    """``sglang serve`` too, and for a draft path that names no folder (SGLang's own path
    would ask the model hub and print its 'Repo id' traceback)."""
    import os

    missing = tmp_path / "missing-draft"
    sglang = os.path.join(os.path.dirname(sys.executable), "sglang")
    result = subprocess.run(
        [sglang, "serve", "--model-path", tiny_pair[0], "--device", "cpu",
         "--speculative-algorithm", "DSDE", "--speculative-draft-model-path", str(missing)],
        env=dict(os.environ, **_cpu_env()), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Repo id" not in result.stderr
    assert (f"sglang-dsde: error: --speculative-draft-model-path = '{missing}': no such "
            f"directory") in result.stderr
