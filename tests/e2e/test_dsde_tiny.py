"""``--speculative-algorithm DSDE`` end to end on CPU with tiny random models.

Real server processes on loopback (started and stopped here, ``tests/e2e/conftest.py``).
Each behaviour is checked against a server without speculation: greedy DSDE output equals
it token for token; with the target as its own draft no first draft is missed; DSDE adapts (the batch step count moves, per-request SLs differ); NaN
draft logits neither crash the server nor change the output; 1,000 short requests with
20% client disconnects leave no DSDE slot behind; an SGLang frontend program runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
import time

import pytest

from tools.testing import TINY_PROMPTS as PROMPTS
from tools.testing import make_tiny_llama, running_server

MAX_TOTAL_TOKENS = 4096
# The paper's policy, with a short window so requests finish warm-up within a few rounds
# and the policy acts. (The default policy, goodput, has its own test below.)
DSDE_ARGS = ["--dsde-policy", "dsde", "--dsde-window", "4", "--dsde-max-steps", "6",
             "--dsde-min-steps", "1"]


def _dsde_server(target, draft, logs, extra=()):
    return running_server(target, draft_model_path=draft, algorithm="DSDE", num_steps=3,
                          max_total_tokens=MAX_TOTAL_TOKENS, log_dir=logs,
                          extra_args=[*DSDE_ARGS, *extra])


@pytest.fixture(scope="module")
def dsde(tiny_models, noisy_draft, server_logs):
    """DSDE with a noisy copy of the target as its draft: drafts are accepted in runs of
    varying length, so SLs move (with the target as its own draft every request would
    accept everything; ``test_every_policy_tiny.py`` serves that pair)."""
    with _dsde_server(tiny_models.target, noisy_draft, server_logs,
                      extra=["--enable-metrics"]) as server:
        yield server


def _dsde_state(server) -> dict:
    for state in server.server_info().get("internal_states", []) or []:
        if "dsde" in state:
            return state["dsde"]
    raise AssertionError("no DSDE state in /server_info")


def _generate_all(server, prompts, max_new_tokens=32):
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: server.generate(p, max_new_tokens=max_new_tokens),
                             prompts))


def test_greedy_dsde_output_equals_plain(plain, dsde):
    want = [r["output_ids"] for r in _generate_all(plain, PROMPTS)]
    got = _generate_all(dsde, PROMPTS)
    for prompt, w, g in zip(PROMPTS, want, got):
        assert g["output_ids"] == w, prompt
    one_by_one = [dsde.generate(p, max_new_tokens=32)["output_ids"] for p in PROMPTS[:3]]
    assert one_by_one == want[:3]


def test_step_count_and_per_request_lengths_adapt(dsde):
    # Easy (repetitive, code) and hard (random token soup) prompts in one batch.
    rng = random.Random(0)
    hard = ["".join(rng.choice("qzxjkvbw{}#@!") for _ in range(40)) for _ in range(4)]
    easy = ["one, two, three, four, five, six,", "def add(a, b):\n    return a + b\n"] * 2
    results = _generate_all(dsde, easy + hard, max_new_tokens=48)
    cap_lengths = {round(r["meta_info"]["spec_cap_length"], 3) for r in results}
    assert len(cap_lengths) > 1, cap_lengths
    for r in results:  # per-round mean KL and next SL of each request, in meta_info
        meta = r["meta_info"]
        assert len(meta["dsde_kl"]) == len(meta["dsde_sl"]) == meta["spec_verify_ct"]
        assert all(kl >= 0 for kl in meta["dsde_kl"])
        assert sum(meta["dsde_sl"]) / len(meta["dsde_sl"]) == pytest.approx(
            meta["spec_cap_length"])
    histograms = [r["meta_info"]["spec_cap_lens_histogram"] for r in results]
    assert all(sum(h) == r["meta_info"]["spec_verify_ct"] for h, r in zip(histograms, results))
    state = _dsde_state(dsde)
    assert len(state["batch_steps_histogram"]) > 1, state
    assert state["policy"] == "dsde" and state["rounds"] > 0


def test_ragged_verify_verifies_each_requests_own_length(plain, dsde):
    """The default ragged verify on the CPU engine: mixed requests at once (and one at a
    time), greedy output equal to the plain server's, and fewer target tokens verified
    than the batch's full windows (the mean verify width per request below the batch's
    K + 1)."""
    rng = random.Random(1)
    hard = ["".join(rng.choice("qzxjkvbw{}#@!") for _ in range(30)) for _ in range(3)]
    prompts = PROMPTS[:5] + hard
    lengths = [8, 40, 16, 32, 24, 12, 28, 20]  # mixed output lengths
    before = _dsde_state(dsde)

    def run(server):
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda a: server.generate(a[0], max_new_tokens=a[1])[
                "output_ids"], zip(prompts, lengths)))

    want = run(plain)
    assert run(dsde) == want                                    # C = 8
    after = _dsde_state(dsde)
    verified = after["verified_tokens"] - before["verified_tokens"]
    window = after["window_tokens"] - before["window_tokens"]
    rounds = after["request_rounds"] - before["request_rounds"]
    assert rounds > 0 and verified < window, (verified, window, rounds)
    # C = 1: one request at a time, the same outputs
    assert [dsde.generate(p, max_new_tokens=n)["output_ids"]
            for p, n in zip(prompts[:3], lengths[:3])] == want[:3]


def test_prometheus_series(dsde):
    import requests

    dsde.generate(PROMPTS[0], max_new_tokens=16)
    text = requests.get(f"{dsde.base_url}/metrics", timeout=30).text
    rounds = [line for line in text.splitlines()
              if line.startswith("sglang:dsde_rounds_total")]
    assert rounds and float(rounds[0].split()[-1]) > 0, rounds
    assert "sglang:dsde_batch_steps_bucket" in text


def _nan_draft(tiny_models, tmp_path_factory):
    """A copy of the 1-layer draft whose LM head row 7 is NaN: every draft row is NaN."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("nan-draft")
    path = make_tiny_llama(root / "draft", num_layers=1, seed=1)
    weights_file = next(path.glob("*.safetensors"))
    weights = load_file(weights_file)
    weights["lm_head.weight"][7] = float("nan")
    save_file(weights, weights_file, metadata={"format": "pt"})
    return path


def test_nan_draft_logits_do_not_crash_or_change_output(plain, tiny_models, server_logs,
                                                        tmp_path_factory):
    draft = _nan_draft(tiny_models, tmp_path_factory)
    want = [r["output_ids"] for r in _generate_all(plain, PROMPTS[:4])]
    with _dsde_server(tiny_models.target, draft, server_logs) as server:
        results = _generate_all(server, PROMPTS[:4])
        got = [r["output_ids"] for r in results]
        assert server.healthy()
        assert all(kl is None for r in results for kl in r["meta_info"]["dsde_kl"])
        state = _dsde_state(server)
        log = server.log_path.read_text(errors="replace")
    assert got == want
    assert state["skipped_signals"] > 0, state
    assert log.count("their signal was skipped") == 1  # warned once


async def _load(base_url: str, num_requests: int, abort_fraction: float, seed: int) -> dict:
    import aiohttp

    rng = random.Random(seed)
    counts = {"done": 0, "aborted": 0}
    limit = asyncio.Semaphore(32)

    async def one(session, i):
        abort = rng.random() < abort_fraction
        payload = {"text": PROMPTS[i % len(PROMPTS)] + f" {i}",
                   "sampling_params": {"temperature": 0.0, "ignore_eos": True,
                                       "max_new_tokens": 64 if abort else rng.randint(1, 6)},
                   "stream": abort}
        async with limit:
            async with session.post(f"{base_url}/generate", json=payload) as resp:
                assert resp.status == 200, await resp.text()
                if abort:  # disconnect after the first streamed chunk: the server aborts
                    await resp.content.readline()
                    resp.close()
                    counts["aborted"] += 1
                else:
                    body = await resp.json()
                    assert body["meta_info"]["completion_tokens"] >= 1
                    counts["done"] += 1

    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(num_requests)))
    return counts


def test_thousand_requests_with_aborts_leave_no_stale_state(plain, dsde):
    counts = asyncio.run(_load(dsde.base_url, 1000, 0.2, seed=0))
    assert counts["done"] + counts["aborted"] == 1000 and counts["aborted"] > 100
    # Aborted requests are released by the scheduler asynchronously: wait, bounded.
    deadline = time.monotonic() + 120
    while (state := _dsde_state(dsde))["live_slots"] and time.monotonic() < deadline:
        time.sleep(0.5)  # polling interval of a bounded wait, not synchronisation
    assert state["live_slots"] == 0, state
    assert dsde.healthy()
    assert (dsde.generate(PROMPTS[5])["output_ids"]
            == plain.generate(PROMPTS[5])["output_ids"])


def test_sglang_frontend_program(plain, dsde):
    import sglang as sgl

    @sgl.function
    def complete(s, prompt):
        s += prompt
        s += sgl.gen("answer", max_tokens=16, temperature=0)

    answers = []
    for server in (plain, dsde):
        state = complete.run(prompt=PROMPTS[1], backend=sgl.RuntimeEndpoint(server.base_url))
        answers.append(state["answer"])
    assert answers[0] == answers[1]
    assert answers[1]  # the program produced text


def _default_policy_run(plain, target, draft, logs):
    """Outputs of a plain server and of a DSDE server with no --dsde-policy (goodput), and
    the DSDE server's state after the prompts."""
    want = [r["output_ids"] for r in _generate_all(plain, PROMPTS)]
    with running_server(target, draft_model_path=draft, algorithm="DSDE", num_steps=3,
                        max_total_tokens=MAX_TOTAL_TOKENS, log_dir=logs,
                        extra_args=["--dsde-max-steps", "6"]) as server:
        got = [r["output_ids"] for r in _generate_all(server, PROMPTS)]
        return want, got, _dsde_state(server)


def test_default_goodput_policy_is_lossless_and_learns_round_costs(plain, tiny_models,
                                                                   server_logs):
    """No --dsde-policy: the cost-aware policy; it times rounds and learns acceptance."""
    want, got, state = _default_policy_run(plain, tiny_models.target, tiny_models.target,
                                           server_logs)
    assert got == want
    assert state["policy"] == "goodput" and state["rounds"] > 0, state
    learned = state["learned"]
    # The decode rounds were timed and moved the cost model off its prior (relative
    # units, a decode step ~ 1; these rounds take milliseconds); the acceptance rate left
    # its prior of 0.5 (draft == target: the aligned draft's drafts are accepted).
    assert learned["timed_rounds"] > 0, learned
    assert max(learned["round_cost_coefs"].values()) < 0.5, learned
    assert learned["acceptance_rate"] != 0.5, learned


def test_goodput_stops_drafting_when_the_draft_is_useless_and_stays_lossless(
        plain, tiny_models, server_logs):
    """A random 1-layer draft is almost never accepted: the policy turns drafting off
    (the free off: a plain target decode, no draft forward) for most rounds, catches the
    draft up when it probes, and the output is still the target's."""
    want, got, state = _default_policy_run(plain, tiny_models.target, tiny_models.draft,
                                           server_logs)
    assert got == want
    histogram = {int(k): v for k, v in state["batch_steps_histogram"].items()}
    assert histogram.get(0, 0) > sum(histogram.values()) / 2, histogram
    assert state["plain_off_rounds"] > 0 and state["draft_kv"]["catch_ups"] > 0, state
    assert state["skipped_signals"] == 0, state  # a round without drafts is not a fault
