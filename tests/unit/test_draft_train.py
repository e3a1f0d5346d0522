"""sglang_dsde.draft.train: student construction, the hand-written KL gradient, a short
distillation that learns, checkpoint resume, export + assembly -- tiny random Llamas."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sglang_dsde.draft import data, prepare, train  # noqa: E402
from tools.testing import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "t", num_layers=4)


def _teacher(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def test_init_layers():
    assert train.init_layers("k4-first", 30) == [0, 1, 2, 3]
    assert train.init_layers("k4-spread", 30) == [0, 10, 19, 29]
    assert train.init_layers("k6-firstlast", 30) == [0, 1, 2, 3, 28, 29]
    with pytest.raises(ValueError):
        train.init_layers("k40-first", 30)
    with pytest.raises(ValueError):
        train.init_layers("k2-middle", 30)


def test_student_copies_layers_and_shares_frozen_head(teacher_path):
    t = _teacher(teacher_path)
    shared = train.frozen_shared(t)
    a = train.make_student(t, [0, 3], shared=shared)
    b = train.make_student(t, [1], shared=shared)
    assert a.config.num_hidden_layers == 2 and b.config.num_hidden_layers == 1
    assert torch.equal(a.model.layers[1].mlp.up_proj.weight, t.model.layers[3].mlp.up_proj.weight)
    assert a.lm_head.weight is b.lm_head.weight and not a.lm_head.weight.requires_grad
    assert torch.equal(a.lm_head.weight, t.lm_head.weight)
    names = set(train.trainable_state(a))
    assert "model.norm.weight" in names and not any("embed" in n or "lm_head" in n for n in names)
    assert sum(p.numel() for p in train.trainable_params(a)) == \
        sum(v.numel() for v in train.trainable_state(a).values())
    # a full-depth copy is the teacher
    full = train.make_student(t, list(range(4)), shared=shared)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, t(ids).logits, atol=1e-5, rtol=1e-5)


def test_kl_and_grad_matches_autograd():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 8, generator=g)
    h_s = torch.randn(7, 8, generator=g)
    h_t = torch.randn(7, 8, generator=g)
    kl, grad, agree = train.kl_and_grad(h_s, h_t, w, 7, chunk_rows=3)
    x = h_s.clone().requires_grad_(True)
    lt, ls = torch.log_softmax(h_t @ w.t(), -1), torch.log_softmax(x @ w.t(), -1)
    ref = (lt.exp() * (lt - ls)).sum(-1).mean()
    ref.backward()
    assert abs(kl - float(ref.detach())) < 1e-5
    torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-4)
    assert agree == int(((h_t @ w.t()).argmax(-1) == (h_s @ w.t()).argmax(-1)).sum())


def _examples(t, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 2] + torch.randint(3, 300, (int(k),), generator=g).tolist()
               for k in torch.randint(3, 12, (n,), generator=g)]
    answers, hidden = data.generate_batch(t, prompts, max_new_tokens=10, eos_ids=[0], pad_id=0,
                                          return_hidden=True)
    ps = data.PromptSet({"ids": np.asarray([x for p in prompts for x in p], np.uint16),
                         "offsets": np.cumsum([0] + [len(p) for p in prompts]),
                         "kind": np.zeros(n, np.int8), "split": np.zeros(n, np.int8),
                         "names": np.asarray([str(i) for i in range(n)])})
    gens = [(i, a, "train-greedy", data.hidden_to_numpy(h)) for i, (a, h) in enumerate(zip(answers, hidden))]
    return train.build_examples(ps, gens, 64)


def test_examples_and_batches(teacher_path):
    t = _teacher(teacher_path)
    ex = _examples(t)
    assert all(e.loss_start == 1 for e in ex)  # shared prefix [1, 2]: loss from position 1
    assert all(len(e.hidden) == len(e.ids) - 1 for e in ex)
    batches = train.plan_train_batches([len(e.ids) for e in ex], 64)
    assert sorted(i for b in batches for i in b) == list(range(len(ex)))
    assert all(len(b) * max(len(ex[i].ids) for i in b) <= 64 for b in batches if len(b) > 1)
    ids, sel, h_t = train.collate([ex[i] for i in batches[0]], pad_id=0)
    assert h_t.shape == (int(sel.sum()), 64) and h_t.dtype == torch.bfloat16
    order = [train.batch_for_step(5, s, 0) for s in range(10)]
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5)) and order[:5] != order[5:]


def _run(t, ex, ckpt, steps, stop_at=None):
    cfg = train.TrainConfig(students=["k1-first"], lr=3e-3, warmup=2, steps=steps,
                            tokens_per_batch=96, log_every=1, seed=1)
    shared = train.frozen_shared(t)
    if stop_at is not None:  # an interrupted session, then a fresh process resuming
        part = train.train({"k1-first": train.make_student(t, [0], shared=shared)}, ex, cfg,
                           ckpt, pad_id=0, bf16=False, stop_after=stop_at)
        assert part["steps"] == stop_at and not part["finished"]
    st = {"k1-first": train.make_student(t, [0], shared=shared)}
    return train.train(st, ex, cfg, ckpt, pad_id=0, bf16=False,
                       eval_fn=lambda s, step: {"k1-first": {"agreement": 0.0}})


def test_training_lowers_kl_and_resumes_exactly(teacher_path, tmp_path):
    t = _teacher(teacher_path)
    ex = _examples(t)
    out = _run(t, ex, tmp_path / "a.pt", steps=12)
    kls = [h["k1-first"]["kl"] for h in out["history"] if "k1-first" in h and "kl" in h["k1-first"]]
    assert kls[-1] < kls[0]
    assert out["history"][-1]["eval"] == {"k1-first": {"agreement": 0.0}}
    resumed = _run(t, ex, tmp_path / "b.pt", steps=12, stop_at=5)
    a = train.trainable_state(out["students"]["k1-first"])
    b = train.trainable_state(resumed["students"]["k1-first"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_export_and_assemble_draft(teacher_path, tmp_path):
    t = _teacher(teacher_path)
    st = train.make_student(t, [0, 2], shared=train.frozen_shared(t))
    with torch.no_grad():
        for p in train.trainable_params(st):
            p.add_(0.01)
    files = train.export_student(st, tmp_path / "w", layers_per_file=1, meta={"student": "k2-first"})
    assert [f.name for f in files] == ["draft-01-of-02.safetensors", "draft-02-of-02.safetensors"]
    man = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert man["num_hidden_layers"] == 2 and man["student"] == "k2-first"
    assert set(prepare.verify_checksums(tmp_path / "w")) == {f.name for f in files}
    d = prepare.assemble_draft(teacher_path, tmp_path / "w", tmp_path / "draft")
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert prepare.assemble_draft(teacher_path, tmp_path / "w", tmp_path / "draft") == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime  # idempotent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    draft = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert draft.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(d).get_vocab() == AutoTokenizer.from_pretrained(teacher_path).get_vocab()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():  # bf16-stored layers: close to the student, not equal
        torch.testing.assert_close(draft(ids).logits, st(ids).logits, atol=0.05, rtol=0.05)
    # a corrupted file is refused
    with open(files[0], "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="checksum"):
        prepare.assemble_draft(teacher_path, tmp_path / "w", tmp_path / "draft2")


def _full_kl(st, ex):
    ids, sel, h_t = train.collate(ex, pad_id=0)
    with torch.no_grad():
        h_s = st.model(input_ids=ids).last_hidden_state[sel]
    kl, _, _ = train.kl_and_grad(h_s, h_t.float(), st.lm_head.weight, int(sel.sum()))
    return kl


def test_subset_vocabulary_loss_also_lowers_the_full_kl(teacher_path):
    t = _teacher(teacher_path)
    ex = _examples(t)
    freq = train.frequent_tokens(ex, 20, 300)
    assert len(freq) == 20 and len(set(freq.tolist())) == 20
    counts = np.bincount(np.concatenate([e.ids for e in ex]), minlength=300)
    assert counts[freq].min() >= np.delete(counts, freq).max()
    cfg = train.TrainConfig(students=["k1-first"], lr=3e-3, warmup=2, steps=12,
                            tokens_per_batch=96, log_every=4, seed=1, loss_vocab=40,
                            loss_vocab_random=20)
    st = {"k1-first": train.make_student(t, [0], shared=train.frozen_shared(t))}
    before = _full_kl(st["k1-first"], ex)
    train.train(st, ex, cfg, None, pad_id=0, bf16=False)
    assert _full_kl(st["k1-first"], ex) < before
