"""What users send to a DSDE server on CPU, against a server without speculation (tiny
random models, real servers on loopback, started and stopped here).

Sampled requests follow the plain server's distribution and ``n > 1`` gives independent
samples; penalised greedy requests equal the plain server token for token; malformed
prompts get a 400 and leave the server alive; a request at the KV limit completes or is
refused up front; the accept metrics count the drafts each round proposed.

The plain reference is ``plain_reference`` (``conftest.py``: no overlap scheduling, the
only plain server whose penalties count every earlier output token).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import random
import re

import pytest
import requests

from tools.testing import TINY_PROMPTS as PROMPTS
from tools.testing import ServerError, running_server

MAX_TOTAL_TOKENS = 4096
MAX_STEPS = 6
INITIAL_STEPS = 3


@pytest.fixture(scope="module")
def dsde(tiny_models, server_logs):
    """The paper's policy with a short window (SLs move within a request), the target as
    its own draft (drafts are accepted and rejected), INFO logs for the decode lines.
    Without overlap scheduling, as ``plain_reference``: with it, SGLang applies penalties
    one token late on any server, and each round's step count is decided a round ahead.
    Every step count in range is a runtime state, so each round drafts the request's SL."""
    with running_server(tiny_models.target, draft_model_path=tiny_models.target,
                        algorithm="DSDE", num_steps=INITIAL_STEPS,
                        max_total_tokens=MAX_TOTAL_TOKENS, log_dir=server_logs,
                        extra_args=["--dsde-policy", "dsde", "--dsde-window", "4",
                                    "--dsde-max-steps", str(MAX_STEPS), "--dsde-min-steps", "1",
                                    "--dsde-state-steps", *map(str, range(1, MAX_STEPS + 1)),
                                    "--disable-overlap-schedule",
                                    "--enable-metrics", "--log-level", "info"]) as server:
        yield server


def _samples(server, prompt, n, max_new_tokens=3, **params):
    """``n`` samples of one prompt from one request (SGLang's parallel sampling)."""
    sampling = {"temperature": 1.0, "max_new_tokens": max_new_tokens, "n": n, **params}
    r = requests.post(f"{server.base_url}/generate",
                      json={"text": prompt, "sampling_params": sampling}, timeout=600)
    assert r.status_code == 200, r.text
    return [tuple(out["output_ids"]) for out in r.json()]


def _homogeneity_p_value(a, b, min_count=5):
    """Chi-square test that two samples of sequences come from one distribution; sequences
    seen fewer than ``min_count`` times in each sample on average are pooled."""
    from scipy.stats import chi2_contingency

    ca, cb = collections.Counter(a), collections.Counter(b)
    keys = [k for k in set(ca) | set(cb) if ca[k] + cb[k] >= 2 * min_count]
    rows = [[ca[k] for k in keys], [cb[k] for k in keys]]
    rest = (len(a) - sum(rows[0]), len(b) - sum(rows[1]))
    if sum(rest):
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    return chi2_contingency(rows)[1]


SAMPLING = [{"temperature": 0.5}, {"top_k": 3},
            {"temperature": 0.7, "top_p": 0.8, "min_p": 0.1}]


@pytest.mark.parametrize("params", SAMPLING, ids=lambda p: ",".join(f"{k}={v}" for k, v in
                                                                    p.items()))
def test_sampled_tokens_follow_the_plain_servers_distribution(plain, dsde, params):
    """600 samples of the first three tokens from each server (tokens 2 and 3 come from
    verify passes: drafts accepted, rejected and resampled). Tolerance: a chi-square test
    of homogeneity must not reject at p < 1e-4 (a greedy verify fails it)."""
    prompt = PROMPTS[3]
    want = _samples(plain, prompt, 600, **params)
    got = _samples(dsde, prompt, 600, **params)
    assert _homogeneity_p_value(want, got) >= 1e-4
    assert len(set(got)) >= 0.7 * len(set(want)), (len(set(got)), len(set(want)))


def test_temperature_one_gives_distinct_outputs_and_n_gives_independent_samples(dsde):
    """Issue 16's figure on the tiny pair: 8 tries at T = 1, 12 tokens, here with top_k = 3
    (the tiny model's T = 1 distribution is so flat that the first token, sampled at
    prefill, alone makes 8 outputs distinct; with top_k = 3 a greedy verify leaves at most
    3 distinct outputs, one per first token)."""
    tries = [dsde.generate("Once upon a time", max_new_tokens=12, temperature=1.0,
                           top_k=3)["output_ids"] for _ in range(8)]
    assert len({tuple(t) for t in tries}) >= 6
    one_request = _samples(dsde, "Once upon a time", 8, max_new_tokens=12, top_k=3)
    assert len(set(one_request)) >= 6


PENALTIES = [{"repetition_penalty": 1.3}, {"frequency_penalty": 1.0, "presence_penalty": 1.0},
             {"presence_penalty": -0.8}, {"min_new_tokens": 20}]


@pytest.mark.parametrize("params", PENALTIES, ids=lambda p: ",".join(p))
def test_penalised_greedy_requests_equal_plain(plain, dsde, params):
    def outputs(server, mixed):
        def one(i):
            extra = params if (not mixed or i % 2) else {}
            return server.generate(PROMPTS[i], max_new_tokens=48, **extra)["output_ids"]

        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(one, range(len(PROMPTS))))

    for mixed in (False, True):  # all penalised / every other request penalised
        assert outputs(dsde, mixed) == outputs(plain, mixed), mixed


BAD = [({"text": ""}, "The prompt is empty (0 tokens)"),
       ({"input_ids": []}, None),
       ({"input_ids": [5, 10 ** 6, 7]}, "input_ids[1] = 1000000: expected a token id in [0, "),
       ({"input_ids": [5, -3]}, "input_ids[1] = -3: expected a token id in [0, ")]


def test_malformed_prompts_get_400_and_the_servers_stay_up(plain, dsde):
    for server in (plain, dsde):
        for body, message in BAD:
            r = requests.post(f"{server.base_url}/generate",
                              json={**body, "sampling_params": {"max_new_tokens": 4}},
                              timeout=60)
            assert r.status_code == 400, (body, r.status_code, r.text)
            assert message is None or message in r.text, r.text
        assert server.healthy()
        assert server.generate(PROMPTS[0], max_new_tokens=4)["output_ids"]


def _long_prompt(length):
    rng = random.Random(0)
    return [rng.randrange(5, 290) for _ in range(length)]


def test_a_request_at_the_kv_limit_completes_or_is_refused_up_front(plain, dsde):
    """Issue 16's case: a 3,750-token prompt + 340 new tokens in a 4,096-token pool. The
    plain server completes it; the speculative server refuses it at once with a 400 giving
    the largest max_new_tokens that fits, and completes that one to the last token."""
    prompt = _long_prompt(3750)
    assert plain.generate(input_ids=prompt, max_new_tokens=340,
                          ignore_eos=True)["meta_info"]["completion_tokens"] == 340
    with pytest.raises(ServerError) as refused:
        dsde.generate(input_ids=prompt, max_new_tokens=340, ignore_eos=True)
    assert refused.value.status_code == 400
    fits = int(re.search(r"the largest max_new_tokens that fits is (\d+)",
                         refused.value.body).group(1))
    # SGLang's per-decode reserve: 2 x the widest window, which the aligned draft widens
    # by one slot (its decode draft extend writes one past the verify window).
    reserve = 2 * (MAX_STEPS + 2)
    assert f"the speculative decode reserve ({reserve} tokens)" in refused.value.body
    assert fits == MAX_TOTAL_TOKENS - 3750 - reserve + 1
    done = dsde.generate(input_ids=prompt, max_new_tokens=fits, ignore_eos=True)
    assert done["meta_info"]["completion_tokens"] == fits
    assert done["meta_info"]["finish_reason"]["type"] == "length"


def _batch_steps_histogram(server):
    for state in server.server_info().get("internal_states", []) or []:
        if "dsde" in state:
            return collections.Counter({int(k): v for k, v in
                                        state["dsde"]["batch_steps_histogram"].items()})
    raise AssertionError("no DSDE state in /server_info")


def test_accept_metrics_count_the_drafts_each_round_proposed(dsde):
    """One request at a time, so each round drafts that request's SL: the proposed drafts
    are the histogram's steps, the initial SL plus the request's dsde_sl but its last, and
    every rate divides by them (meta_info, each decode log line, the Prometheus gauge)."""
    step_values = set()
    for prompt in ("qzx{}#@!vbw kj", "def add(a, b):\n    return a + b\n"):
        before = _batch_steps_histogram(dsde)
        meta = dsde.generate(prompt, max_new_tokens=96)["meta_info"]
        rounds = _batch_steps_histogram(dsde) - before
        drafted = sum(steps * count for steps, count in rounds.items())
        assert meta["spec_verify_ct"] == sum(rounds.values()) == len(meta["dsde_sl"])
        assert meta["spec_num_proposed_drafts"] == drafted
        assert drafted == INITIAL_STEPS + sum(meta["dsde_sl"][:-1])
        assert meta["spec_accept_rate"] == pytest.approx(meta["spec_num_correct_drafts"] / drafted)
        step_values |= set(rounds)
    assert len(step_values) > 1, "the step count never moved: a constant width was tested"
    lines = [line for line in dsde.log_path.read_text(errors="replace").splitlines()
             if "Decode batch" in line and "accept rate" in line]
    assert lines
    pattern = re.compile(r"#running-req: 1,.*accept len: ([0-9.]+), accept rate: ([0-9.]+),.*"
                         r"dsde steps: (\d+)")
    checked = 0
    for line in lines:
        match = pattern.search(line)
        if match and int(match.group(3)) > 0:  # one request, one round per line
            accept_len, rate, steps = float(match.group(1)), float(match.group(2)), \
                int(match.group(3))
            assert rate == pytest.approx((accept_len - 1) / steps, abs=0.006), line
            checked += 1
    assert checked > 10
    gauge = [line for line in requests.get(f"{dsde.base_url}/metrics", timeout=30).text
             .splitlines() if line.startswith("sglang:spec_accept_rate")]
    last_rate = float(re.search(r"accept rate: ([0-9.]+)", lines[-1]).group(1))
    assert gauge and float(gauge[0].split()[-1]) == pytest.approx(last_rate, abs=0.006)
