"""Pure parts of bench/compare.py: arguments, contenders, log parsing, tables (no servers)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import compare  # noqa: E402

SPEC_LINE = ("[2025-01-01 00:00:00] Decode batch, #running-req: 4, #token: 900, "
             "token usage: 0.22, accept len: 1.50, accept rate: 0.25, cpu graph: False, "
             "gen throughput (token/s): 30.00, #queue-req: 0")
PLAIN_LINE = ("[2025-01-01 00:00:01] Decode batch, #running-req: 1, #token: 100, "
              "token usage: 0.02, cpu graph: False, gen throughput (token/s): 10.00, "
              "#queue-req: 0")


def test_parse_args_quick_and_full_defaults():
    q = compare.parse_args(["--quick"])
    assert (q.workloads, q.concurrency, q.temperatures, q.static_steps) == (
        ["mix"], [1, 4], [0.0], [1, 2])
    assert q.stem == "quick" and q.max_new_tokens <= 48 and q.num_prompts <= 8
    f = compare.parse_args([])
    assert f.workloads == ["chat", "code", "mix"] and f.concurrency == [1, 8]
    assert f.temperatures == [0.0, 1.0] and f.static_steps == [1, 2, 4] and f.stem == "full"


def test_parse_args_rejects_bad_values():
    with pytest.raises(SystemExit):
        compare.parse_args(["--concurrency", "0"])
    with pytest.raises(SystemExit):
        compare.parse_args(["--contenders", "nope"])
    assert compare.parse_args(["--quick", "--contenders", "dsde"]).contenders == ["dsde"]


def test_contenders():
    cs = {c.name: c for c in compare.contenders_for([1, 2])}
    assert list(cs) == ["static:0", "static:1", "static:2", "sglang_adaptive", "dsde",
                        "dsde-padded", "dsde+cut", "goodput", "goodput-padded", "adaedl",
                        "adaedl-padded"]
    goodput = compare.server_kwargs(cs["goodput"], "D", 4)
    assert goodput["algorithm"] == "DSDE" and goodput["num_steps"] == 4
    assert goodput["extra_args"][:4] == ["--dsde-max-steps", "4", "--dsde-policy", "goodput"]
    assert cs["static:0"].server_kwargs("D", max_steps=4)["algorithm"] is None
    assert cs["static:2"].server_kwargs("D", max_steps=4) == {
        "algorithm": "STANDALONE", "draft_model_path": "D", "num_steps": 2, "extra_args": []}
    assert "--dsde-per-request-cut" in compare.server_kwargs(cs["dsde+cut"], "D", 4)["extra_args"]
    assert "--no-dsde-ragged-verify" in compare.server_kwargs(cs["goodput-padded"], "D",
                                                              4)["extra_args"]
    assert cs["sglang_adaptive"].server_kwargs("D", max_steps=4)["extra_args"][3] == \
        "sglang_adaptive"
    extra = compare.server_kwargs(cs["dsde"], "D", 4)["extra_args"]
    assert extra[-4:] == ["--log-level", "info", "--decode-log-interval", "1"]


def test_decode_log_parsing_and_accept_length():
    lines = compare.parse_decode_lines("\n".join([SPEC_LINE, "noise", SPEC_LINE.replace(
        "#running-req: 4", "#running-req: 2").replace("accept len: 1.50", "accept len: 1.20")]))
    assert lines == [(4, 1.5, 30.0), (2, 1.2, 30.0)]
    assert compare.cell_accept_length(lines) == pytest.approx((4 * 1.5 + 2 * 1.2) / 6)
    assert compare.cell_accept_length([]) is None
    assert compare.parse_decode_lines(PLAIN_LINE) == [(1, 1.0, 10.0)]
    samples = compare.round_samples(lines + [(1, 1.0, 0.0)], steps=2)
    assert samples == [(4, 2, pytest.approx(0.2)), (2, 2, pytest.approx(0.08))]
    med = compare.median_samples([(1, 0, 3.0), (1, 0, 1.0), (1, 0, 2.0), (2, 1, 5.0)])
    assert med == [(1, 0, 2.0), (2, 1, 5.0)]


def _result(tp, lat=2000.0):
    return {"completed": 4, "total_output_tokens": 128, "duration": 10.0,
            "output_throughput": tp, "mean_e2e_latency_ms": lat,
            "median_e2e_latency_ms": lat, "p99_e2e_latency_ms": 2 * lat,
            "mean_ttft_ms": 100.0, "mean_tpot_ms": 50.0, "accept_length": 1.3}


def test_rows_ratios_and_tables(tmp_path):
    from sglang_dsde.sim import report

    tps = {("chat", "static:0"): 10.0, ("chat", "static:1"): 12.0, ("chat", "static:2"): 11.0,
           ("chat", "dsde"): 9.0, ("code", "static:0"): 10.0, ("code", "static:1"): 11.0,
           ("code", "static:2"): 14.0, ("code", "dsde"): 15.0}
    rows = [compare.bench_row(_result(tp), contender=name, accept_length=None,
                              workload=w, concurrency=1, temperature=0.0)
            for (w, name), tp in tps.items()]
    assert rows[0]["latency_mean"] == 2.0 and rows[0]["latency_p99"] == 4.0
    assert rows[0]["tpot_mean"] == 50.0 and rows[0]["server_accept_length"] == 1.3
    report.add_ratios(rows, cell_keys=compare.CELL_KEYS)
    report.add_single_static(rows, compare.CELL_KEYS, across=("workload",))
    by = {(r["workload"], r["contender"]): r for r in rows}
    assert by[("chat", "dsde")]["static_opt"] == "static:1"
    assert by[("chat", "dsde")]["vs_static_opt"] == pytest.approx(9 / 12)
    # geo-mean: static:2 sqrt(11*14) > static:1 sqrt(12*11) -> global best is static:2
    assert by[("chat", "dsde")]["static_global"] == "static:2"
    assert by[("chat", "dsde")]["vs_static_global"] == pytest.approx(9 / 11)
    assert by[("code", "dsde")]["vs_static_global"] == pytest.approx(15 / 14)
    md = report.write_tables(rows, tmp_path / "t", title="x", cell_keys=compare.CELL_KEYS,
                             columns=compare.COLUMNS)
    text = md.read_text()
    assert "x static-global" in text and "## workload code, concurrency 1" in text
    assert len(json.loads((tmp_path / "t.json").read_text())["rows"]) == len(rows)


def test_sl_log_and_validation_rows():
    log = compare.sl_log({"a": [4, 3, 2], "b": [4]})
    assert log == [{"a": 4, "b": 4}, {"a": 3}, {"a": 2}]
    v = compare.validation_rows({1: 1.04, 2: 1.2}, {1: 1.0, 2: None})
    assert v[0]["rel_err"] == pytest.approx(0.04) and v[0]["within_5pct"]
    assert v[1]["rel_err"] is None and v[1]["within_5pct"] is None


def test_bench_serving_cmd_and_dataset(tmp_path):
    cmd = compare.bench_serving_cmd(base_url="http://127.0.0.1:1", model="M",
                                    dataset=tmp_path / "d.jsonl", num_prompts=3,
                                    max_new_tokens=16, concurrency=4, temperature=1.0,
                                    seed=7, output_file=tmp_path / "o.jsonl")
    joined = " ".join(cmd)
    for part in ("-m sglang.bench_serving", "--backend sglang", "--dataset-name custom",
                 "--max-concurrency 4", "--request-rate inf", "--temperature 1.0",
                 "--seed 7", "--sharegpt-output-len 16", "--warmup-requests 0"):
        assert part in joined

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    class P:
        id, input_ids = "p0", (1, 2, 3)

    path = compare.write_dataset(tmp_path / "d.jsonl", [P()], Tok())
    rec = json.loads(path.read_text())
    assert rec["conversations"][0]["content"] == "1 2 3"
    assert len(rec["conversations"]) == 2
