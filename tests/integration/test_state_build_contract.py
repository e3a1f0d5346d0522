"""The runtime-state contract between DSDE's worker and SGLang's real ``AdaptiveController``.

What runs is SGLang's: ``AdaptiveController`` (register, ``init_states``, activation),
``EAGLEWorkerV2.build_adaptive_runtime_state`` with its ``_override_worker_state``, and
``EAGLEWorkerV2.apply_runtime_state``, under a published, resolved DSDE configuration;
and DSDE's: ``_StepSchedule`` (the candidate states and their pruned graph batch sizes)
and ``DSDEWorkerV2``'s overrides (``apply_runtime_state``, the draft-extend runner
wrapper). Only the model side is a stand-in, since no model is loaded here: the draft
worker's backend and graph-capture calls record what they see (the worker's step count
and the graph batch sizes in force) and hand out fresh runner objects, as SGLang's
capture does; the draft worker's chain buffers are SGLang's own code.

The contract: every state is built once; while a state builds, the worker's step count
(what the draft-step recording reads as it is captured) is the state's; each state
captures the batch sizes DSDE's schedule kept for it; after every switch the worker runs
the state's step count and its draft-extend runner records its output (the wrapper);
and switches leave SGLang's overrides log and the log output bounded.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from sglang_dsde import states
from sglang_dsde.args import dsde_config_of
from sglang_dsde.config import state_steps_for
from sglang_dsde.worker.aligned import wrap_draft_state

GRAPH_BS = [1, 2, 4, 8, 16, 24, 32, 48]
INITIAL = 4


class _GraphRunner:
    def execute(self, *args, **kwargs):
        return ("output of", self)


class _AttnBackend:
    def init_forward_metadata(self, forward_batch):
        return None


def _draft_side(worker, server_args):
    from sglang.srt.runtime_context import get_exec
    from sglang.srt.speculative.base_spec_worker import EagleDraftWorkerBase

    class DraftSide(EagleDraftWorkerBase):
        """The draft model's side of a state build (module docstring)."""

        def __init__(self):
            self.topk, self.device, self.server_args = 1, "cpu", server_args
            self.speculative_num_steps = INITIAL
            self.speculative_num_draft_tokens = INITIAL + 1
            self.draft_runner = SimpleNamespace(draft_attn_backend=None, attn_backend=None)
            self.builds = []
            self.init_attention_backend()
            self.cuda_graph_runner = _GraphRunner()
            self.cuda_graph_runner_for_draft_extend = _GraphRunner()

        def draft(self):
            raise NotImplementedError

        def draft_extend(self):
            raise NotImplementedError

        def init_attention_backend(self):
            self.draft_attn_backend = _AttnBackend()
            self.draft_extend_attn_backend = _AttnBackend()

        def _capture_cuda_graphs(self):
            self.builds.append(dict(worker_steps=worker.speculative_num_steps,
                                    draft_steps=self.speculative_num_steps,
                                    graph_bs=list(get_exec().graph.cuda_graph_bs_decode)))
            self.cuda_graph_runner = _GraphRunner()
            self.cuda_graph_runner_for_draft_extend = _GraphRunner()

    return DraftSide()


@pytest.fixture
def worker(plugins_loaded, tiny_pair, tmp_path):
    """A ``DSDEWorkerV2`` whose model side is a stand-in, under a published config, as
    TP rank 0 of a one-process group (so SGLang's rank-0 log lines are emitted)."""
    import torch.distributed as dist
    from sglang.srt.runtime_context import get_context, get_parallel, reset_context
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.speculative.base_spec_worker import BaseSpecWorker

    from sglang_dsde.worker.v2 import DSDEWorkerV2

    target, draft = tiny_pair
    server_args = prepare_server_args([
        "--model-path", target, "--speculative-algorithm", "DSDE",
        "--speculative-draft-model-path", draft, "--device", "cpu",
        "--speculative-num-steps", str(INITIAL)])
    server_args.resolve_once()
    get_context().set_server_args(server_args)
    w = DSDEWorkerV2.__new__(DSDEWorkerV2)
    BaseSpecWorker.__init__(w)
    w.server_args, w.device, w.gpu_id, w.topk = server_args, "cpu", 0, 1
    w.speculative_num_steps, w.speculative_num_draft_tokens = INITIAL, INITIAL + 1
    w.dsde_config, w.dsde_initial_steps = dsde_config_of(server_args), INITIAL
    w._draft_worker = _draft_side(w, server_args)
    w._target_worker = SimpleNamespace(model_runner=SimpleNamespace(
        model_config=SimpleNamespace(vocab_size=300), attn_backend=object(),
        decode_cuda_graph_runner=None, init_new_workspace=False,
        _get_attention_backend=lambda init_new_workspace=False: object()))
    w._init_step_states()
    # Where the draft-extend wrapper reports the slots it wrote (draft_sync.DraftSync).
    w.draft_sync = SimpleNamespace(written=[], mark_written=lambda fb: w.draft_sync.written
                                   .append(fb))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    try:
        with get_parallel().override(tp_rank=0):
            yield w
    finally:
        dist.destroy_process_group()
        reset_context()


def _start_up(w):
    """What ``EAGLEWorkerV2.init_cuda_graphs`` does once the start-up state is captured
    (register it, build the others), then DSDE's wrapper (``init_cuda_graphs``)."""
    from sglang.srt.speculative.adaptive_runtime_state import SpecRuntimeState

    dw, runner = w._draft_worker, w._target_worker.model_runner
    w.adaptive_controller.register(SpecRuntimeState(
        speculative_num_steps=INITIAL, speculative_num_draft_tokens=INITIAL + 1,
        draft_attn_backend=dw.draft_attn_backend, cuda_graph_runner=dw.cuda_graph_runner,
        target_attn_backend=runner.attn_backend, target_graph_runner=None,
        draft_extend_attn_backend=dw.draft_extend_attn_backend,
        cuda_graph_runner_for_draft_extend=dw.cuda_graph_runner_for_draft_extend))
    w.adaptive_controller.init_states(cuda_graph_bs=GRAPH_BS)
    w._wrap_extend_graph_runner()
    wrap_draft_state(dw)


def test_every_state_is_built_once_at_its_own_step_count(worker, caplog):
    with caplog.at_level(logging.INFO, logger="sglang_dsde.worker.v2"):
        _start_up(worker)
    runnable = state_steps_for(worker.dsde_config, INITIAL)
    assert runnable == (0, 1, 2, 3, 4, 6, 10) and len(runnable) <= 7
    builds = worker._draft_worker.builds
    built = sorted(b["draft_steps"] for b in builds)
    assert built == [s for s in runnable if s != INITIAL]      # each once; 4 at start-up
    for b in builds:
        assert b["worker_steps"] == b["draft_steps"]            # what the recording reads
        assert b["graph_bs"] == states.graph_batch_sizes(GRAPH_BS, b["draft_steps"])
    assert worker.speculative_num_steps == INITIAL              # back on the start-up state
    assert sorted(worker.adaptive_controller._states) == list(runnable)
    line = [r.getMessage() for r in caplog.records if "runtime states" in r.getMessage()]
    assert len(line) == 1 and "7 runtime states (steps 0 1 2 3 4 6 10" in line[0]


def test_every_switch_runs_the_state_and_keeps_the_extend_output_wrapper(worker, caplog):
    from sglang.srt.runtime_context import get_context

    _start_up(worker)
    log = get_context()._overrides_log
    entries_after_start_up = len(log)
    schedule, dw = worker._schedule, worker._draft_worker
    order = [0, 10, 1, 6, 2, 4, 3, 10, 0, 4] * 30
    with caplog.at_level(logging.INFO):
        for steps in order:
            schedule.planned_steps = steps
            worker.activate_step_by_batch(8)                 # SGLang's per-round entry
            assert worker.speculative_num_steps == dw.speculative_num_steps == steps
            state = worker.adaptive_controller._states[steps]
            assert dw.cuda_graph_runner_for_draft_extend is \
                state.cuda_graph_runner_for_draft_extend
            runner = dw.cuda_graph_runner_for_draft_extend
            worker._extend_output = None
            assert getattr(runner, "_dsde_wrapped", False)
            assert runner.execute("batch") == worker._extend_output  # its output is kept
            assert worker.draft_sync.written[-1] == "batch"          # and its slots
            # the aligned draft loop's wrappers (aligned.wrap_draft_state) on this state
            assert getattr(dw.draft_attn_backend, "_dsde_aligned", False)
            assert getattr(dw.cuda_graph_runner, "_dsde_aligned", False)
    switches = sum(a != b for a, b in zip([INITIAL] + order, order))
    assert worker.num_state_switches == switches == len(order)
    # Nothing grows per switch: one switch entry in SGLang's overrides log, no INFO
    # line per switch, and what the log's readers see is the state now running.
    assert len(log) <= entries_after_start_up + 1
    assert get_context().resolved_server_args_dict()["speculative_num_steps"] == order[-1]
    assert not [r for r in caplog.records if "Switch adaptive runtime state" in r.getMessage()]
