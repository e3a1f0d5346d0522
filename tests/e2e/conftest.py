"""End-to-end fixtures: real SGLang CPU servers on loopback, started and stopped here.

Every server is bounded (``--max-total-tokens``), runs ``--dtype float32`` and is polled
on ``/health`` with a bounded start-up wait (``tools.testing.launch_server``).
Servers are module-scoped, so at most one module's servers live at a time, except
``plain_reference``: one server without speculation that several modules compare with
(package scope: started once, stopped after the last e2e module).
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from tools.testing import make_tiny_llama, running_server


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A random-weight 2-layer target and a 1-layer draft with the same tokenizer."""
    root = tmp_path_factory.mktemp("e2e-tiny")
    return SimpleNamespace(
        target=make_tiny_llama(root / "target", num_layers=2, seed=0),
        draft=make_tiny_llama(root / "draft", num_layers=1, seed=1),
    )


@pytest.fixture(scope="session")
def noisy_draft(tiny_models, tmp_path_factory):
    """The target with Gaussian noise (5% of each matrix's std) on its weight matrices: a
    draft the target accepts often, not always."""
    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("noisy-draft") / "draft"
    shutil.copytree(tiny_models.target, path)
    weights_file = next(path.glob("*.safetensors"))
    weights = load_file(weights_file)
    gen = torch.Generator().manual_seed(1)
    for name, w in weights.items():
        if w.dtype.is_floating_point and w.dim() == 2:
            weights[name] = w + 0.05 * w.std() * torch.randn(w.shape, generator=gen)
    save_file(weights, weights_file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="package")
def plain_reference(tiny_models, server_logs):
    """The tiny target without speculation and without overlap scheduling: with overlap,
    SGLang feeds each output token to the penalizers one decode step late (it reads
    ``req.output_ids[-1]`` before the in-flight token lands), so only this server applies
    penalties over every earlier output token. Greedy and sampled outputs do not depend
    on it."""
    with running_server(tiny_models.target, algorithm=None, max_total_tokens=4096,
                        log_dir=server_logs,
                        extra_args=["--disable-overlap-schedule"]) as server:
        yield server


@pytest.fixture(scope="package")
def plain(plain_reference):
    """``plain_reference`` under the name the DSDE modules compare with (greedy outputs do
    not depend on its overlap setting); a module may start a ``plain`` of its own."""
    return plain_reference
