"""The policy replay CLI: exact output, one-line errors with exit status 2, and agreement
with the independent per-request reference on random traces."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsde_reference import reference_replay
from sglang_dsde.config import DSDEConfig
from sglang_dsde.replay import main, run_rounds
from sglang_dsde.trace import read_trace

REPO = Path(__file__).resolve().parents[2]
HAND_TRACE = Path(__file__).parent / "data" / "dsde_hand_trace.jsonl"

# tests/unit/data/dsde_hand_trace.jsonl with --window 6 --decay 0.5 (defaults otherwise):
# rounds 1-3 are worked out in test_dsde_policy.test_bounds_prediction_and_cap_by_hand;
# round 4: b (T = 2, done) -> 3 (test_sampled_request_divides_mean_kl_by_temperature);
# round 5: b is new again (done forgot it): warm-up, accepted 0 < 4 -> stays 4;
#   a: history 6 x 0.125 is flat -> WVIR 20, SF = e^0.25 - 1 = 0.284 -> x 5.7 > 1 -> k_min 2;
#   cap = ceil(2 / 1) = 2 (b is still warming up: neither counted nor capped).
HAND_EXPECTED = (
    '{"round": 1, "cap": null, "steps": {"a": 8, "b": 4}}\n'
    '{"round": 2, "cap": 5, "steps": {"a": 5, "b": 3}}\n'
    '{"round": 3, "cap": 6, "steps": {"a": 6}}\n'
    '{"round": 4, "cap": 3, "steps": {"b": 3}}\n'
    '{"round": 5, "cap": 2, "steps": {"b": 4, "a": 2}}\n'
)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, "-m", "sglang_dsde.replay", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_cli_replays_hand_trace_exactly():
    proc = run_cli(HAND_TRACE, "--window", "6", "--decay", "0.5")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == HAND_EXPECTED


def test_cli_bad_line_exits_2_with_one_line_and_no_output(tmp_path):
    trace = tmp_path / "bad.jsonl"
    good = HAND_TRACE.read_text().splitlines()[0]
    trace.write_text(good + "\n" + '{"round": 2, "request": "a", "drafted": 2, "accepted": 1, '
                     '"kl": [0.1, NaN]}\n')
    proc = run_cli(trace)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"replay: {trace}:2: field 'kl[1]': NaN\n"


def test_cli_bad_knob_exits_2():
    proc = run_cli(HAND_TRACE, "--window", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("replay: --dsde-window (DSDE knob 'window') = 0: expected an "
                           "integer in [1, 1024]\n")


GOOD = '{"round": 1, "request": "a", "drafted": 2, "accepted": 1, "kl": [0.1, 0.2]}'


@pytest.mark.parametrize("bad,message", [
    ('{"round": 2, "request": "a", "drafted": 2', "malformed JSON: Expecting"),
    ('[1, 2]', "expected a JSON object"),
    ('{"round": 2, "request": "a", "drafted": 3, "accepted": 1, "kl": [0.1, 0.2]}',
     "field 'kl' has 2 values; expected drafted = 3"),
    ('{"round": 2, "request": "a", "drafted": 2, "accepted": -1, "kl": [0.1, 0.2]}',
     "field 'accepted' = -1: negative"),
    ('{"round": 2, "request": "a", "drafted": 2, "accepted": 1, "kl": [0.1, -0.2]}',
     "field 'kl[1]' = -0.2: negative"),
    ('{"round": 2, "request": "a", "drafted": 1, "accepted": 1, "kl": [Infinity]}',
     "field 'kl[0]': infinite"),
    ('{"round": 2, "request": "a", "drafted": 1, "accepted": 1, "kl": [0.1], '
     '"temperature": NaN}', "field 'temperature': NaN"),
    ('{"round": 2, "request": "a", "drafted": 1, "accepted": 2, "kl": [0.1]}',
     "accepted = 2 exceeds drafted = 1"),
    ('{"round": 2, "request": "a", "drafted": 1.0, "accepted": 1, "kl": [0.1]}',
     "field 'drafted' = 1.0: expected a non-negative integer"),
    ('{"round": 2, "request": "a", "drafted": 1, "accepted": 1}', "missing field 'kl'"),
    ('{"round": 2, "request": "a", "drafted": 1, "accepted": 1, "kl": [0.1], "done": 1}',
     "field 'done' = 1: expected true or false"),
    ('{"round": 0, "request": "a", "drafted": 1, "accepted": 1, "kl": [0.1]}',
     "round 0 after round 1: rounds must be non-decreasing"),
    ('{"round": 1, "request": "a", "drafted": 1, "accepted": 1, "kl": [0.1]}',
     "request 'a' appears twice in round 1"),
])
def test_bad_input_is_one_line_with_its_line_number(tmp_path, capsys, bad, message):
    trace = tmp_path / "t.jsonl"
    trace.write_text(GOOD + "\n\n" + bad + "\n" + GOOD.replace('"round": 1', '"round": 9'))
    assert main([str(trace)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"replay: {trace}:3: {message}") and err.count("\n") == 1


def test_missing_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("replay: cannot read") and err.count("\n") == 1


def test_adaedl_needs_draft_entropy(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text(GOOD + "\n")
    assert main([str(trace), "--policy", "adaedl"]) == 2
    assert "missing field 'draft_entropy'" in capsys.readouterr().err
    trace.write_text(GOOD[:-1] + ', "draft_entropy": [0.1, 0.2]}\n')
    assert main([str(trace), "--policy", "adaedl", "--min-steps", "1"]) == 0
    assert capsys.readouterr().out == '{"round": 1, "cap": null, "steps": {"a": 3}}\n'


def test_baseline_policies_and_knob_spellings(capsys):
    assert main([str(HAND_TRACE), "--policy", "static", "--dsde-initial-steps", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["cap"] for x in lines] == [None] * 5
    assert all(set(x["steps"].values()) == {3} for x in lines)
    assert main([str(HAND_TRACE), "--policy", "sglang_adaptive"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    # Tier 1 candidates [1, 3, 5, 7] snapped to the runtime states (0 1 2 3 4 6 10):
    # [1, 3, 4, 6]; the initial 4 is one of them; 5 rounds stay inside its 10-round
    # warm-up.
    assert all(set(x["steps"].values()) == {4} for x in lines)
    assert main([str(HAND_TRACE), "--window", "6", "--decay", "0.5", "--no-batch-cap"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[1] == {"round": 2, "cap": None, "steps": {"a": 7, "b": 3}}


def test_initial_steps_default_is_clamped_into_the_sl_range(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"round": 1, "request": 7, "drafted": 0, "accepted": 0, "kl": []}\n')
    assert main([str(trace), "--max-steps", "3", "--min-steps", "1"]) == 0
    assert capsys.readouterr().out == '{"round": 1, "cap": null, "steps": {"7": 3}}\n'


# ---------------------------------------------------------------------------------------

@st.composite
def traces(draw):
    ids = draw(st.lists(st.text("abcxyz", min_size=1, max_size=3), min_size=1, max_size=7,
                        unique=True))
    lines, rnd = [], draw(st.integers(0, 3))
    for _ in range(draw(st.integers(1, 30))):
        rnd += draw(st.integers(1, 3))
        present = draw(st.permutations(ids))[:draw(st.integers(1, len(ids)))]
        for rid in present:
            drafted = draw(st.integers(0, 11))
            line = dict(round=rnd, request=rid, drafted=drafted,
                        accepted=draw(st.integers(0, drafted)),
                        kl=draw(st.lists(st.one_of(st.floats(0, 4, allow_nan=False),
                                                   st.sampled_from([0.0, 0.1, 0.5])),
                                         min_size=drafted, max_size=drafted)),
                        temperature=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0])))
            if draw(st.integers(0, 9)) == 0:
                line["done"] = True
            lines.append(line)
    return lines


@settings(max_examples=120, deadline=None)
@given(lines=traces(), window=st.sampled_from([1, 2, 5, 9, 30]),
       decay=st.sampled_from([0.9, 0.85, 0.5]), initial=st.integers(2, 10))
def test_replay_equals_independent_reference(lines, window, decay, initial):
    text = [json.dumps(x) for x in lines]
    view = read_trace(text)
    assert view.max_slots <= (len({x["request"] for x in lines})
                              + sum(bool(x.get("done")) for x in lines))
    cfg = DSDEConfig(policy="dsde", window=window, decay=decay, initial_steps=initial)
    got = [json.dumps(x) for x in run_rounds(view, cfg)]
    want = [json.dumps(x) for x in reference_replay(lines, window=window, decay=decay,
                                                    initial_steps=initial)]
    assert got == want


# -- one trace format: a trace replayed closed loop, its round view open loop --------------

def _goodput_trace(tmp_path, num_requests=6, seed=3):
    from sglang_dsde.trace import TraceWriter, synthetic_trace

    trace = synthetic_trace(num_requests, 40, 6, 0.7, seed=seed)
    path = tmp_path / "sim-trace.jsonl"
    writer = TraceWriter(path, trace.header)
    for req in trace.requests:
        writer.append(req)
    return path, read_trace(path)


@pytest.mark.parametrize("policy,concurrency", [("goodput", 1), ("goodput", 3), ("dsde", 3)])
def test_cli_closed_loop_equals_the_simulator(tmp_path, policy, concurrency):
    """``replay TRACE --policy goodput`` on a per-position trace prints exactly the
    simulator's decisions for the same trace and cost model."""
    from sglang_dsde.sim import PolicyController, cost_from_spec, simulate
    from sglang_dsde.sim.cost import default_context

    path, trace = _goodput_trace(tmp_path)
    cost = cost_from_spec("h100-llama3-8b", context=default_context(trace.requests))
    controller = PolicyController(DSDEConfig(policy=policy, max_steps=trace.max_steps),
                                  max_slots=concurrency)
    simulate(trace.requests, controller, cost, concurrency=concurrency)
    proc = run_cli(path, "--policy", policy, "--cost", "h100-llama3-8b",
                   "--concurrency", concurrency)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines() == [json.dumps(d) for d in controller.decisions]
    assert len(controller.decisions) > 20
    if policy == "goodput":  # the policy did speculate and changed its mind on the way
        steps = {s for d in controller.decisions for s in d["steps"].values()}
        assert len(steps) > 1, steps


@pytest.mark.parametrize("policy", ["goodput", "dsde", "sglang_adaptive", "adaedl"])
def test_open_loop_replay_of_the_simulators_round_view_gives_its_decisions(tmp_path, policy):
    """The round view the simulator derives from a trace (what each request drafted,
    accepted, its KL, the round's cost) replays open loop into the same decisions."""
    from sglang_dsde.sim import PolicyController, cost_from_spec, simulate

    _, trace = _goodput_trace(tmp_path, seed=5)
    cfg = DSDEConfig(policy=policy, max_steps=trace.max_steps)
    controller = PolicyController(cfg, max_slots=3)
    result = simulate(trace.requests, controller, cost_from_spec("bs1-cpu"), concurrency=3,
                      log_rounds=True)
    view = read_trace(result.round_view)
    assert list(run_rounds(view, cfg)) == controller.decisions
