"""STANDALONE speculative decoding on CPU (stock SGLang + this plugin), tiny models.

Every behaviour is checked against a server without speculation: greedy outputs equal
token for token, ``max_new_tokens`` 1, stop strings, a prompt over the KV budget (clean
error, server stays up) and an aborted request. With draft == target, the accept length
reported by ``/server_info`` is above 1.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tools.testing import TINY_PROMPTS as PROMPTS
from tools.testing import ServerError, running_server

MAX_TOTAL_TOKENS = 1024


def _server(models, logs, draft):
    return running_server(
        models.target,
        draft_model_path=draft,
        algorithm="STANDALONE" if draft is not None else None,
        num_steps=4,
        max_total_tokens=MAX_TOTAL_TOKENS,
        log_dir=logs,
    )


@pytest.fixture(scope="module")
def plain(tiny_models, server_logs):
    with _server(tiny_models, server_logs, None) as server:
        yield server


@pytest.fixture(scope="module")
def spec_self(tiny_models, server_logs):
    """STANDALONE with the target as its own draft."""
    with _server(tiny_models, server_logs, tiny_models.target) as server:
        yield server


def _outputs(server, prompts, *, concurrent: bool, max_new_tokens=32):
    call = lambda p: server.generate(p, max_new_tokens=max_new_tokens)  # noqa: E731
    if not concurrent:
        return [call(p) for p in prompts]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(call, prompts))


def test_greedy_outputs_equal_plain_token_for_token(plain, spec_self):
    """Random weights make the self-draft miss often (the draft sees the sequence without
    its first token: SGLang's shifted draft inputs), so accepted and rejected drafts are
    both exercised."""
    for concurrent in (False, True):
        prompts = PROMPTS[:3] if not concurrent else PROMPTS
        want = [r["output_ids"] for r in _outputs(plain, prompts, concurrent=concurrent)]
        got = [r["output_ids"] for r in _outputs(spec_self, prompts, concurrent=concurrent)]
        for prompt, w, g in zip(prompts, want, got):
            assert g == w, f"concurrent={concurrent} prompt={prompt!r}"


def test_accept_length_above_one_with_draft_equal_to_target(spec_self):
    results = _outputs(spec_self, PROMPTS[:4], concurrent=True)
    per_request = [r["meta_info"]["spec_accept_length"] for r in results]
    assert all(a >= 1 for a in per_request)
    accept = spec_self.accept_length()  # /server_info, lifetime average
    assert accept is not None and accept > 1, (accept, per_request)


def test_max_new_tokens_one(plain, spec_self):
    want = plain.generate(PROMPTS[0], max_new_tokens=1)
    got = spec_self.generate(PROMPTS[0], max_new_tokens=1)
    assert len(got["output_ids"]) == 1
    assert got["output_ids"] == want["output_ids"]
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]


def test_stop_string(plain, spec_self):
    full = plain.generate(PROMPTS[1], max_new_tokens=32)["text"]
    stop = full[len(full) // 3: len(full) // 3 + 2]
    want = plain.generate(PROMPTS[1], max_new_tokens=32, stop=[stop])
    got = spec_self.generate(PROMPTS[1], max_new_tokens=32, stop=[stop])
    assert want["meta_info"]["finish_reason"]["type"] == "stop"
    assert got["text"] == want["text"]
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    assert len(got["text"]) < len(full)


def test_prompt_longer_than_kv_budget_is_a_clean_error(plain, spec_self):
    too_long = [5] * (MAX_TOTAL_TOKENS + 200)
    errors = []
    for server in (plain, spec_self):
        with pytest.raises(ServerError) as info:
            server.generate(input_ids=too_long, max_new_tokens=4)
        errors.append((info.value.status_code, info.value.body))
        assert server.healthy()
    assert errors[0] == errors[1]
    assert errors[1][0] == 400 and "exceeds the maximum allowed length" in errors[1][1]
    # Still serving, and still lossless.
    assert (spec_self.generate(PROMPTS[2])["output_ids"]
            == plain.generate(PROMPTS[2])["output_ids"])


def test_aborted_request(plain, spec_self):
    for i, server in enumerate((plain, spec_self)):
        rid = f"abort-me-{i}"
        chunks = []
        for chunk in server.stream_generate(PROMPTS[3], max_new_tokens=2000, ignore_eos=True,
                                            rid=rid):
            if not chunks:
                server.abort(rid)  # the request is running: it has streamed a chunk
            chunks.append(chunk)
        final = chunks[-1]["meta_info"]
        assert final["finish_reason"]["type"] == "abort", final["finish_reason"]
        assert final["completion_tokens"] < 2000
        assert server.healthy()
    assert (spec_self.generate(PROMPTS[4])["output_ids"]
            == plain.generate(PROMPTS[4])["output_ids"])


def test_tree_drafts_topk2_equal_plain(tiny_models, server_logs, plain):
    """EAGLE's draft tree (topk 2) through the same CPU path: tree mask, tree build, verify."""
    with running_server(tiny_models.target, draft_model_path=tiny_models.target,
                        algorithm="STANDALONE", num_steps=3, max_total_tokens=MAX_TOTAL_TOKENS,
                        log_dir=server_logs,
                        extra_args=["--speculative-eagle-topk", "2",
                                    "--speculative-num-draft-tokens", "6"]) as tree:
        got = [r["output_ids"] for r in _outputs(tree, PROMPTS, concurrent=True)]
        accept = tree.accept_length()
    want = [r["output_ids"] for r in _outputs(plain, PROMPTS, concurrent=True)]
    assert got == want
    assert accept is not None and accept > 1
