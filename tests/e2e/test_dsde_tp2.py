"""DSDE's default policy at tensor parallelism 2 on SGLang's CPU engine (gloo groups).

Two TP ranks run every forward together, so they must take the same step count every
round: a rank in another runtime state runs a verify of another width and the ranks'
collectives stop matching (an error or a hang). Each rank times its rounds on its own
clock; the worker shares rank 0's cost sample (``DSDEWorkerV2._tp_share``) so the
goodput policy sees the same inputs on both. The server here serves concurrent requests
through many rounds and several step counts, and its greedy output equals a server
without speculation (TP 1). ``tests/unit/test_tp_agreement.py`` counts the agreement
round by round; this is the real engine.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tools.serving import cpu_server_env
from tools.testing import TINY_PROMPTS as PROMPTS
from tools.testing import running_server

MAX_TOTAL_TOKENS = 4096


def _generate_all(server, prompts, max_new_tokens=32):
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: server.generate(p, max_new_tokens=max_new_tokens),
                             prompts))


@pytest.fixture(scope="module")
def plain_outputs(tiny_models, server_logs):
    with running_server(tiny_models.target, algorithm=None, max_total_tokens=MAX_TOTAL_TOKENS,
                        log_dir=server_logs) as server:
        return [r["output_ids"] for r in _generate_all(server, PROMPTS)]


def test_two_tp_ranks_switch_states_together_and_stay_lossless(tiny_models, server_logs,
                                                               plain_outputs):
    # One core per rank (SGLang's CPU engine binds each rank's threads).
    env = cpu_server_env({"SGLANG_CPU_OMP_THREADS_BIND": "0|1"})
    with running_server(tiny_models.target, draft_model_path=tiny_models.target,
                        algorithm="DSDE", num_steps=3, max_total_tokens=MAX_TOTAL_TOKENS,
                        log_dir=server_logs, env=env, startup_timeout=600,
                        extra_args=["--tp-size", "2", "--dsde-max-steps", "6"]) as server:
        got = [r["output_ids"] for r in _generate_all(server, PROMPTS)]
        again = [r["output_ids"] for r in _generate_all(server, PROMPTS[:4], 48)]
        assert server.healthy()
        state = next(s["dsde"] for s in server.server_info()["internal_states"]
                     if "dsde" in s)
    assert got == plain_outputs
    assert len(again) == 4
    assert state["policy"] == "goodput" and state["rounds"] > 10
    assert len(state["batch_steps_histogram"]) >= 3, state   # states did switch
    assert state["state_switches"] > 0
