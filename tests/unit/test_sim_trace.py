"""The trace format: round trip, resumable writer, validation, agreement runs."""

import json

import numpy as np
import pytest

from sglang_dsde.trace import (TraceError, TraceWriter, check_request, make_header,
                                   read_trace, run_violations, runs_to_accept,
                                   synthetic_request, synthetic_trace, trace_summary)


def header(**kw):
    base = dict(max_steps=3, max_new_tokens=8, target="t", draft="d", workload="w", seed=0,
                stop_at_eos=True)
    base.update(kw)
    return make_header(**base)


def test_runs_to_accept_caps_at_max_steps_and_the_end():
    agree = np.array([1, 1, 1, 1, 0, 1, 1], dtype=bool)
    assert runs_to_accept(agree, 3).tolist() == [3, 3, 2, 1, 0, 2, 1]


def test_round_trip_and_resume_after_an_interrupted_line(tmp_path):
    path = tmp_path / "t.jsonl"
    a = synthetic_request("a", [1, 0, 1, 1, 0], 3)
    b = synthetic_request("b", [0, 1, 1, 1, 1, 1], 3)
    writer = TraceWriter(path, header())
    writer.append(a)
    with open(path, "a") as f:          # a crash in the middle of the next line
        f.write('{"id": "b", "accept": [0, 1')
    resumed = TraceWriter(path, header())
    assert resumed.done_ids == {"a"}
    resumed.append(b)
    trace = read_trace(path)
    assert [r.id for r in trace.requests] == ["a", "b"]
    np.testing.assert_array_equal(trace.requests[1].accept, b.accept)
    np.testing.assert_allclose(trace.requests[0].kl, a.kl, rtol=1e-6)
    assert trace.max_steps == 3 and trace.header["version"] == 1


def test_resume_with_another_configuration_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    TraceWriter(path, header())
    with pytest.raises(TraceError, match="max_steps"):
        TraceWriter(path, header(max_steps=4))


def test_a_request_recorded_twice_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    writer = TraceWriter(path, header())
    writer.append(synthetic_request("a", [1, 0, 1], 3))
    writer.append(synthetic_request("a", [1, 0, 1], 3))
    with pytest.raises(TraceError, match="twice"):
        read_trace(path)


def test_validation_rejects_out_of_range_accept_and_bad_versions(tmp_path):
    req = synthetic_request("a", [1, 1, 1], 3)
    req.accept[2] = 2                     # only one token left at t = 2
    with pytest.raises(TraceError, match=r"accept\[2\]"):
        check_request(req, 3)
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(dict(header(), version=99)) + "\n")
    with pytest.raises(TraceError, match="version 99"):
        read_trace(path)


def test_synthetic_traces_are_consistent_and_seeded():
    one, two = synthetic_trace(3, 50, 4, 0.5, seed=7), synthetic_trace(3, 50, 4, 0.5, seed=7)
    for r1, r2 in zip(one.requests, two.requests):
        np.testing.assert_array_equal(r1.accept, r2.accept)
        check_request(r1, 4)
        assert run_violations(r1) == 0
    summary = trace_summary(one)
    assert summary["num_tokens"] == 150 and 0.3 < summary["agreement"] < 0.7


def test_committed_sample_traces_are_consistent_greedy_traces():
    """The committed samples of the real pairs (SmolLM2-135M target; the distilled draft,
    4- and 3-bit copies) read back, obey the agreement-run invariant exactly, and their KL separates agreeing
    from disagreeing first draft positions."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "bench" / "results" / "traces" / "sample"
    paths = sorted(root.glob("*.jsonl"))
    assert len(paths) == 3
    for path in paths:
        trace = read_trace(path)
        assert trace.header["target"] == "SmolLM2-135M-Instruct" and trace.max_steps == 8
        assert len(trace.requests) == 4
        for req in trace.requests:
            assert run_violations(req) == 0 and req.verify_disagree == 0
            assert len(req.output_ids) == req.num_tokens and req.prompt_len == len(req.prompt_ids)
        accept = np.concatenate([r.accept for r in trace.requests])
        kl_first = np.concatenate([r.kl[:, 0] for r in trace.requests])
        assert kl_first[accept > 0].mean() < kl_first[accept == 0].mean()
