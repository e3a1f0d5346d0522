"""sglang_dsde.models: the layer-cut draft (the SmolLM2 conversion itself is exercised by
the e2e suite and the draft package's tests)."""

from __future__ import annotations

import json

from sglang_dsde import models
from tools.testing import make_tiny_llama


def test_cut_draft_keeps_the_first_layers_and_the_tokenizer(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    target = make_tiny_llama(tmp_path / "t", num_layers=3)
    draft = models.cut_draft(target, tmp_path / "d", num_layers=2)
    assert json.loads((draft / "config.json").read_text())["num_hidden_layers"] == 2
    assert (draft / "tokenizer.json").read_bytes() == (target / "tokenizer.json").read_bytes()
    keys = set(load_file(str(draft / "model.safetensors")))
    assert not any(k.startswith("model.layers.2.") for k in keys)
    assert "model.norm.weight" in keys and "lm_head.weight" in keys
    full = AutoModelForCausalLM.from_pretrained(target)
    cut = AutoModelForCausalLM.from_pretrained(draft)
    assert torch.equal(cut.model.layers[1].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)
    stamp = (draft / models.CUT_STAMP).stat().st_mtime_ns
    models.cut_draft(target, tmp_path / "d", num_layers=2)  # idempotent: reused
    assert (draft / models.CUT_STAMP).stat().st_mtime_ns == stamp
