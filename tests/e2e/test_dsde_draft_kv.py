"""The aligned draft's KV cache stays exact through off rounds, catch-ups, radix hits,
chunked prefill, retractions and aborts (real CPU servers on loopback, tiny models).

One DSDE server runs the static policy with its batch step count forced through a cycle
of drafting and off rounds (``SGLANG_DSDE_STEP_PATTERN``), reports each round's
first-draft distribution (``SGLANG_DSDE_TRACE_FIRST_DRAFT``), prefills in chunks of 16
tokens and retracts requests every few rounds (SGLang's ``SGLANG_TEST_RETRACT``). The
draft is the target with small weight noise (about 60% greedy agreement), so accepted
runs have every length.

The reference is the draft model run from scratch by transformers over each round's
prefix: at every drafting round (the first after each off run included) the server's
first-draft distribution must equal it (float tolerance), and the round's accept length
must be what that exact draft's greedy chain earns against the target's actual output,
which is what a run without cycles accepts at that position. Output equals a server
without speculation, token for token.
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from tools.testing import TINY_PROMPTS, cpu_server_env, running_server

MAX_TOTAL_TOKENS = 4096
PATTERN = "3,0,0,2,0,0,0,0,1,3,0,3"
NEW_TOKENS = 40



@pytest.fixture(scope="module")
def cycling(tiny_models, noisy_draft, server_logs):
    env = cpu_server_env({"SGLANG_DSDE_STEP_PATTERN": PATTERN,
                          "SGLANG_DSDE_TRACE_FIRST_DRAFT": "1",
                          "SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "7"})
    with running_server(tiny_models.target, draft_model_path=noisy_draft, algorithm="DSDE",
                        num_steps=3, max_total_tokens=MAX_TOTAL_TOKENS, log_dir=server_logs,
                        env=env, extra_args=["--dsde-policy", "static", "--dsde-max-steps",
                                             "3", "--chunked-prefill-size", "16"]) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_models, noisy_draft):
    """transformers models: the target's tokenizer, the draft."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models.target)
    draft = AutoModelForCausalLM.from_pretrained(noisy_draft, dtype=torch.float32).eval()
    return tok, draft


def _state(server) -> dict:
    for state in server.server_info().get("internal_states", []) or []:
        if "dsde" in state:
            return state["dsde"]
    raise AssertionError("no DSDE state in /server_info")


def _generate(server, prompts, **kw):
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda ids: server.generate(
            input_ids=ids, max_new_tokens=NEW_TOKENS, ignore_eos=True, **kw), prompts))


def _check_against_draft(reference, prompt_ids, result) -> int:
    """Every drafting round of ``result``: first-draft distribution and accept length as
    the exact draft gives them. Returns the number of drafting rounds checked."""
    import torch

    _, draft = reference
    seq = list(prompt_ids) + list(result["output_ids"])
    rows = result["meta_info"]["dsde_first_draft"]
    checked = 0
    for row in rows:
        committed, steps, accept = int(row[0]), int(row[1]), int(row[2])
        if steps == 0:
            continue
        context = seq[:committed + 1]
        with torch.no_grad():
            logits = draft(torch.tensor([context])).logits[0, -1]
        want = torch.log_softmax(logits.double(), dim=-1)
        got = torch.tensor(row[3:3 + want.shape[0]], dtype=torch.float64)
        assert torch.allclose(got, want, atol=2e-3), (committed, (got - want).abs().max())
        # The exact draft's greedy chain against the target's actual continuation.
        chain, expected = list(context), 1
        for _ in range(steps):
            with torch.no_grad():
                token = int(draft(torch.tensor([chain])).logits[0, -1].argmax())
            if len(chain) >= len(seq) or token != seq[len(chain)]:
                break
            chain.append(token)
            expected += 1
        if committed + steps + 1 < len(seq):  # the round was not cut by max_new_tokens
            assert accept == expected, (committed, steps, accept, expected)
        checked += 1
    return checked


def test_off_on_cycles_keep_the_draft_exact_and_lossless(plain, cycling, reference):
    tok, _ = reference
    prompts = [tok(p).input_ids for p in TINY_PROMPTS[:6]]
    want = _generate(plain, prompts)
    got = _generate(cycling, prompts)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    checked = sum(_check_against_draft(reference, p, g) for p, g in zip(prompts, got))
    assert checked >= 20, checked
    state = _state(cycling)
    assert state["draft_kv"]["catch_ups"] > 0 and state["draft_kv"]["catch_up_tokens"] > 0
    assert "Testing retraction" in cycling.log_path.read_text(errors="replace")


def _ended_behind(result) -> bool:
    """The request's last two rounds were off: the target committed a token whose draft
    KV was never written (the second off round's), and nothing caught it up."""
    rows = result["meta_info"]["dsde_first_draft"]
    return len(rows) >= 2 and rows[-1][1] == 0 and rows[-2][1] == 0


def test_radix_hit_on_tokens_generated_while_off(plain, cycling, reference):
    tok, _ = reference
    # Fresh prompts (a distinct last token each, so no answer shares radix nodes with
    # another) until one request finishes inside an off run (the pattern decides).
    for token in range(40, 52):
        first = tok(TINY_PROMPTS[6]).input_ids + [token]
        answer = cycling.generate(input_ids=first, max_new_tokens=NEW_TOKENS,
                                  ignore_eos=True)
        if _ended_behind(answer):
            break
    assert _ended_behind(answer)
    repairs = _state(cycling)["draft_kv"]["radix_repairs"]
    deferred = _state(cycling)["draft_kv"]["deferred_prefills"]
    # A follow-up turn: the first exchange is a radix hit whose last tokens have no
    # valid draft KV; the draft must recompute from the first of them. The server is
    # off when it arrives, so its draft prefill is deferred to the catch-up too.
    follow = first + answer["output_ids"] + tok(" What is your name?").input_ids
    got = cycling.generate(input_ids=follow, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    want = plain.generate(input_ids=follow, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert got["output_ids"] == want["output_ids"]
    assert got["meta_info"]["cached_tokens"] > len(first)
    assert _state(cycling)["draft_kv"]["radix_repairs"] > repairs
    assert _state(cycling)["draft_kv"]["deferred_prefills"] > deferred
    assert _check_against_draft(reference, follow, got) > 0


def test_chunked_prefill_while_others_are_off(plain, cycling, reference):
    tok, _ = reference
    long_prompt = tok(" ".join(TINY_PROMPTS)).input_ids  # several 16-token chunks
    assert len(long_prompt) > 40
    prompts = [tok(TINY_PROMPTS[1]).input_ids, long_prompt, tok(TINY_PROMPTS[4]).input_ids]
    want = _generate(plain, prompts)
    got = _generate(cycling, prompts)
    assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
    for p, g in zip(prompts, got):
        _check_against_draft(reference, p, g)


def test_aborts_while_off_leave_no_state_and_stay_exact(plain, cycling, reference):
    tok, _ = reference
    for i, text in enumerate(TINY_PROMPTS[:3]):  # streamed, dropped after a few chunks
        for n, _chunk in enumerate(cycling.stream_generate(text, max_new_tokens=200,
                                                           rid=f"drop-{i}", ignore_eos=True)):
            if n == 3:
                cycling.abort(f"drop-{i}")
                break
    prompts = [tok(p).input_ids for p in TINY_PROMPTS[5:8]]
    got = _generate(cycling, prompts)
    assert [g["output_ids"] for g in got] == [w["output_ids"]
                                              for w in _generate(plain, prompts)]
    for p, g in zip(prompts, got):
        _check_against_draft(reference, p, g)
    assert _state(cycling)["live_slots"] == 0
