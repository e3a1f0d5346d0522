"""The trace recorder against a brute-force recomputation on tiny random Llamas.

Brute force: for every output position t, the draft's greedy chain is rebuilt token by
token with full forwards (no cache), the target distribution at chain position j comes
from a full forward of prompt + output[:t] + chain[:j], and the KL is an independent
float64 formula with the 1e-8 clamp. The recorder uses shared KV caches, batched
positions and custom attention masks; both must agree.
"""

import copy

import numpy as np
import pytest
import torch

from sglang_dsde.sim.record import greedy_generate, record_request
from sglang_dsde.trace import check_request, run_violations
from tools.testing import make_tiny_llama

LOG_FLOOR = float(np.log(1e-8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sim-record")
    path = make_tiny_llama(root / "target", num_layers=2, hidden=64, vocab=300, seed=0)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    draft = copy.deepcopy(target)   # a near copy: the pair agrees often, not always
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.004)
    yield target, draft
    torch.set_num_threads(threads)


def kl64(p_logits, q_logits):
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp.clamp_min(LOG_FLOOR) - lq.clamp_min(LOG_FLOOR))).sum()
                 .clamp_min(0))


@torch.inference_mode()
def brute_force(target, draft, prompt, out, max_steps):
    accept, kls = [], []
    for t in range(len(out)):
        ctx, chain, row = prompt + out[:t], [], []
        for _ in range(max_steps):
            q = draft(torch.tensor([ctx + chain])).logits[0, -1]
            p = target(torch.tensor([ctx + chain])).logits[0, -1]
            row.append(kl64(p, q))
            chain.append(int(q.argmax()))
        a = 0
        while a < max_steps and t + a < len(out) and chain[a] == out[t + a]:
            a += 1
        accept.append(a)
        kls.append(row)
    return np.array(accept), np.array(kls)


@pytest.mark.parametrize("max_steps,chunk", [(3, 5), (1, 4)])
def test_recorder_matches_brute_force(pair, max_steps, chunk):
    target, draft = pair
    prompt = list(range(5, 21))
    req = record_request(target, draft, prompt, max_new_tokens=12, max_steps=max_steps,
                         chunk_positions=chunk, req_id="x")
    assert req.output_ids == greedy_generate(target, prompt, 12)
    accept, kls = brute_force(target, draft, prompt, req.output_ids, max_steps)
    np.testing.assert_array_equal(req.accept, accept)
    np.testing.assert_allclose(req.kl, kls, rtol=1e-4, atol=1e-5)
    check_request(req, max_steps)
    assert req.verify_disagree == 0 and run_violations(req) == 0
    if max_steps > 1:   # the pair is informative: some positions agree, some do not
        assert 0 < int((req.accept > 0).sum()) < req.num_tokens
        assert req.accept.max() >= 2


def test_generation_stops_at_a_stop_token(pair):
    target, _ = pair
    prompt = list(range(5, 21))
    full = greedy_generate(target, prompt, 12)
    stop = full[4]
    cut = greedy_generate(target, prompt, 12, stop_ids=[stop])
    assert cut == full[:full.index(stop) + 1]
