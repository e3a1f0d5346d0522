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
