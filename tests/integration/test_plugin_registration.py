"""The entry point is installed, SGLang's loader runs it, and DSDE resolves to a spec
complete enough for the scheduler."""

from __future__ import annotations

import importlib.metadata

import pytest

import sglang_dsde
from sglang_dsde import plugin


def test_entry_point_is_discoverable():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    ours = [ep for ep in eps if ep.name == "dsde"]
    assert len(ours) == 1
    assert ours[0].value == "sglang_dsde.plugin:register"
    assert ours[0].load() is plugin.register


def test_load_plugins_makes_dsde_resolve(plugins_loaded):
    from sglang.srt.speculative.spec_info import CustomSpecAlgo, SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string("DSDE")
    assert isinstance(algo, CustomSpecAlgo)
    assert algo.name == sglang_dsde.ALGORITHM_NAME
    assert SpeculativeAlgorithm.from_string("dsde") is algo  # names are case-insensitive
    # What the scheduler calls on every spec algorithm, and STANDALONE's answers.
    standalone = SpeculativeAlgorithm.STANDALONE
    for method in ("is_speculative", "is_standalone", "is_eagle", "need_topk",
                   "carries_draft_hidden_states", "supports_grammar_overlap", "has_draft_kv",
                   "supports_mixed_chunk", "supports_ragged_verify"):
        assert getattr(algo, method)() == getattr(standalone, method)(), method
    assert algo.supports_overlap
    assert callable(algo.create_future_map)


def test_factory_returns_the_standalone_v2_worker(plugins_loaded):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.standalone_worker_v2 import StandaloneWorkerV2

    worker_cls = SpeculativeAlgorithm.from_string("DSDE").factory(None)
    assert issubclass(worker_cls, StandaloneWorkerV2)


def test_registration_twice_is_harmless(plugins_loaded, monkeypatch):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    before = SpeculativeAlgorithm.from_string("DSDE")
    plugin.register()  # the module guard
    monkeypatch.setattr(plugin, "_registered", False)
    plugin.register()  # a second copy of the module: SGLang's registry is checked
    assert SpeculativeAlgorithm.from_string("DSDE") is before


def test_sglang_refuses_a_second_registration_of_the_name(plugins_loaded):
    """What the guard protects against: SGLang raises on duplicate names."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    with pytest.raises(ValueError, match="already registered"):
        SpeculativeAlgorithm.register("DSDE")(lambda server_args: None)
