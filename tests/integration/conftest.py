"""Integration fixtures: real SGLang imported, plugins loaded, tiny offline models."""

from __future__ import annotations

import pytest

from tools.testing import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A random-weight target (2 layers) and draft (1 layer) sharing one tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    target = make_tiny_llama(root / "target", num_layers=2, seed=0)
    draft = make_tiny_llama(root / "draft", num_layers=1, seed=1)
    return str(target), str(draft)


@pytest.fixture(scope="session")
def plugins_loaded():
    """SGLang's own plugin loader, as the launcher runs it before parsing arguments."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
