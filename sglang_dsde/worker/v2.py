"""``DSDEWorkerV2``: SGLang's STANDALONE V2 worker plus DSDE (read against SGLang 0.5.23).

DSDE rides the STANDALONE path: a separate draft model sharing the target's vocabulary,
``StandaloneWorkerV2`` (the V2 schema), topk 1. The subclass adds, without copying any of
its code:

* the draft distributions: ``draft_runner.forward`` is wrapped on this instance to copy
  each draft decode step's logits into the runtime's buffer (the copies are captured with
  the draft loop in CUDA graphs) and to keep the draft-extend output, whose rows become
  each request's first-draft distribution for the next round (kept by slot);
* the signal and the policy after every verify (``verify`` override), the per-request SL
  reported as SGLang's ``cap_lens`` (meta_info ``spec_cap_length``, histogram);
* the step count: an ``AdaptiveController`` with one pre-built ``SpecRuntimeState`` per
  step value in ``[min_steps, max_steps]`` (SGLang's own mechanism, CUDA-graph safe),
  switched between rounds to the runtime's decision;
* slot lifetime: the request pool's allocation hook resets a slot, ``free_rows`` clears it.

Every SGLang object used here is listed in ``sglang_dsde.worker.HOOKED_SYMBOLS``.
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional

import torch
from sglang.srt.arg_groups.overrides import resolution_result
from sglang.srt.speculative.adaptive_runtime_state import AdaptiveController
from sglang.srt.speculative.standalone_worker_v2 import StandaloneWorkerV2

from sglang_dsde import args
from sglang_dsde.runtime import DSDERuntime
from sglang_dsde.worker.aligned import DSDEDraftWorker, wrap_draft_state
from sglang_dsde.worker.draft_sync import DraftSync
from sglang_dsde.worker.off_round import OffRoundDecode
from sglang_dsde.worker.round_debug import RoundDebug

logger = logging.getLogger(__name__)


class _StepSchedule:
    """SGLang's ``AdaptiveSpecPolicy`` protocol, answering with the runtime's decision."""

    def __init__(self, candidate_steps: List[int], initial_steps: int):
        self._candidates = candidate_steps
        self._graph_bs: Optional[List[int]] = None
        self.planned_steps = initial_steps

    @property
    def candidate_steps(self) -> List[int]:
        return self._candidates

    def set_cuda_graph_bs(self, cuda_graph_bs):
        self._graph_bs = cuda_graph_bs

    def cuda_graph_bs_for_step(self, step: int):
        return self._graph_bs

    def get_steps_for_batch(self, batch_size: int) -> int:
        return self.planned_steps

    def on_verify_complete(self, num_correct_drafts_per_req, batch_size: int):
        return None  # the decision is taken on device in DSDEWorkerV2.verify


class _HostValues:
    """Per-request values, read on the host at first access: the scheduler indexes them
    while processing the round's result, after its device-to-host fence, so the worker
    never waits on the device. NaN (a skipped signal) reads as None (valid JSON)."""

    def __init__(self, values: torch.Tensor):
        self._device_values = values.detach().to("cpu", non_blocking=True)
        self._host: Optional[list] = None

    def __getitem__(self, index: int):
        if self._host is None:
            self._host = [None if v != v else v for v in self._device_values.tolist()]
        return self._host[index]


class DSDEWorkerV2(OffRoundDecode, StandaloneWorkerV2):
    """STANDALONE's worker, plus the DSDE signal, policy and step switching."""

    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        if resolution_result(server_args, "enable_mixed_chunk"):
            raise ValueError("DSDE: --enable-mixed-chunk is not supported (a decode "
                             "request riding a prefill batch would skip its draft update)")
        # The aligned draft (worker/aligned.py): the draft sees each token at its own
        # position; STANDALONE's own worker keeps SGLang's draft worker.
        self._draft_worker.__class__ = DSDEDraftWorker
        self._draft_worker._dsde_owner = self
        self.draft_sync: Optional[DraftSync] = None
        self._debug = RoundDebug.from_env()
        self.dsde_config = args.dsde_config_of(server_args)
        self.dsde_initial_steps = self.speculative_num_steps
        cfg = self.dsde_config
        # Step 0 is SGLang's no-drafting state: a one-token verify (a plain decode
        # through the verify path) plus the draft extend that keeps the draft's KV
        # and the next first-draft distribution current.
        candidates = list(range(cfg.min_steps, cfg.max_steps + 1))
        self._schedule = _StepSchedule(candidates, self.speculative_num_steps)
        self.adaptive_controller = AdaptiveController(self, self._schedule)
        self.dsde: Optional[DSDERuntime] = None
        self._extend_output = None
        self._warned_skipped = False
        self._metrics = None
        if resolution_result(server_args, "enable_metrics"):
            from sglang_dsde.metrics import DSDEMetrics

            self._metrics = DSDEMetrics(
                {"model_name": str(resolution_result(server_args, "served_model_name")
                                   or resolution_result(server_args, "model_path"))},
                cfg.max_steps)

    # -- start-up ---------------------------------------------------------------

    def init_cuda_graphs(self):
        self._init_dsde_runtime()
        super().init_cuda_graphs()
        self._wrap_extend_graph_runner()
        wrap_draft_state(self._draft_worker)

    def apply_runtime_state(self, state) -> None:
        super().apply_runtime_state(state)
        self._wrap_extend_graph_runner()
        wrap_draft_state(self._draft_worker)

    def _wrap_extend_graph_runner(self) -> None:
        """A replayed draft-extend graph bypasses ``forward``: keep its output too."""
        runner = self._draft_worker.cuda_graph_runner_for_draft_extend
        if runner is None or getattr(runner, "_dsde_wrapped", False):
            return
        execute, worker = runner.execute, self

        def execute_recording(forward_batch, *a, **kw):
            worker.draft_sync.mark_written(forward_batch)
            out = execute(forward_batch, *a, **kw)
            worker._extend_output = out
            return out

        runner.execute = execute_recording
        runner._dsde_wrapped = True

    def _init_dsde_runtime(self) -> None:
        pool = self.req_to_token_pool
        max_slots = int(pool.req_to_token.shape[0])
        vocab = int(self._target_worker.model_runner.model_config.vocab_size)
        self.dsde = DSDERuntime(
            self.dsde_config, max_slots=max_slots, max_rows=max_slots,
            vocab_size=vocab, initial_steps=self.dsde_initial_steps,
            device=self.device,
            # Under overlap scheduling the CPU runs one round ahead of the GPU.
            lag_rounds=0 if resolution_result(self.server_args,
                                              "disable_overlap_schedule") else 1,
            min_runnable_steps=self._schedule.candidate_steps[0])
        runtime = self.dsde
        kv_pool = self.token_to_kv_pool_allocator
        self.draft_sync = sync = DraftSync(
            self, max_slots, int(kv_pool.size) + 2 * int(getattr(kv_pool, "page_size", 1)) + 1,
            self.device)

        def on_alloc_rows(rows):
            runtime.on_slots_allocated(torch.as_tensor(rows, dtype=torch.int64))
            sync.on_slots_allocated(rows)

        if getattr(pool, "_on_alloc_rows", None) is None:
            pool.register_on_alloc_rows(on_alloc_rows)
        else:  # another owner (unified KV): call both
            previous = pool._on_alloc_rows
            pool._on_alloc_rows = lambda rows: (previous(rows), on_alloc_rows(rows))
        free_rows = pool.free_rows

        def free_rows_and_forget(indices):
            free_rows(indices)
            runtime.on_slots_freed(torch.as_tensor(list(indices), dtype=torch.int64))

        pool.free_rows = free_rows_and_forget
        self._wrap_draft_runner()
        from sglang_dsde.patches import decode_log

        decode_log.attach(runtime.stats)

    def _wrap_draft_runner(self) -> None:
        draft_worker = self._draft_worker
        runner = draft_worker.draft_runner
        forward, draft_forward = runner.forward, draft_worker.draft_forward
        worker = self

        def forward_recording(forward_batch, *a, **kw):
            out = forward(forward_batch, *a, **kw)
            if forward_batch.forward_mode.is_decode():
                worker.dsde.record_draft_step(out.logits_output.next_token_logits,
                                              steps=worker.speculative_num_steps)
            else:  # draft extend: rows are selected later, on this same object
                worker._extend_output = out.logits_output
                worker.draft_sync.mark_written(forward_batch)
            return out

        def draft_forward_from_step_one(forward_batch):
            worker.dsde.begin_draft_steps()
            return draft_forward(forward_batch)

        runner.forward = forward_recording
        draft_worker.draft_forward = draft_forward_from_step_one

    # -- one round -------------------------------------------------------------

    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None,
                                 pp_proxy_tensors=None):
        is_decode = not (batch.forward_mode.is_extend() or batch.is_extend_in_batch)
        slots = batch.req_pool_indices
        if is_decode and not batch.forward_mode.is_idle():
            pending = self.draft_sync.ledger.pending_tokens(
                [int(r.kv.req_pool_idx) for r in batch.reqs])
            steps = self._debug.steps(self.dsde.next_batch_steps(slots, pending),
                                      self._schedule.candidate_steps[0],
                                      self.dsde_config.max_steps)
            self._schedule.planned_steps = steps
            # Round timing for the cost-aware policy: start to start of decode rounds.
            self.dsde.on_decode_round_start(int(slots.shape[0]), steps, time.perf_counter())
            self.activate_step_by_batch(int(slots.shape[0]))
            # A drafting round first brings every request's draft KV up to date (the
            # catch-up); its outputs are the round's first drafts.
            first_drafts = self.draft_sync.before_decode(batch, steps)
            if first_drafts is not None:
                self.dsde.record_first_draft(slots, first_drafts)
                self.dsde.on_catch_up(self.draft_sync.last_catch_up_tokens)
            self.dsde.begin_round(slots, steps)
            self._warn_skipped_once()
            if self._metrics is not None:
                self._metrics.observe_round(steps, self.dsde.num_skipped_signals)
        else:
            self.dsde.on_other_work()
        self._extend_output = None
        result = super().forward_batch_generation(
            batch, on_publish=on_publish, grammar_barrier=grammar_barrier,
            pp_proxy_tensors=pp_proxy_tensors)
        if self._extend_output is not None and not batch.forward_mode.is_idle():
            self.dsde.record_first_draft(slots, self._extend_output.next_token_logits)
        self._extend_output = None
        if not is_decode:
            self.draft_sync.after_prefill(batch)
        elif not batch.forward_mode.is_idle():
            self._debug.after_round(self, batch, result, steps)
        return result

    def verify(self, batch, pp_proxy_tensors=None, grammar_barrier=None):
        live = not batch.forward_mode.is_idle() and batch.req_pool_indices.shape[0] > 0
        if live and self.dsde_config.per_request_cut:
            self.dsde.cut_chains(batch.req_pool_indices,
                                 batch.spec_info.retrieve_next_token)
        result = super().verify(batch, pp_proxy_tensors=pp_proxy_tensors,
                                grammar_barrier=grammar_barrier)
        if not live:
            return result
        info = batch.sampling_info
        # Greedy requests (SGLang turns T=0 into top_k=1) use raw-logit distributions.
        temperature = torch.where(info.top_ks.reshape(-1) <= 1, 0.0,
                                  info.temperatures.reshape(-1).float())
        result.cap_lens = self.dsde.on_verify(
            batch.req_pool_indices, self.speculative_num_steps,
            result.logits_output.next_token_logits, result.accept_lens, temperature)
        # Per-round values SGLang appends to each request's meta_info (customized_info).
        result.logits_output.customized_info = {
            "dsde_kl": _HostValues(self.dsde.last_req_mean_kl),
            "dsde_sl": _HostValues(result.cap_lens)}
        return result

    def dsde_stats(self) -> dict:
        """DSDE's state for ``/server_info`` (``patches/internal_state.py``)."""
        if self.dsde is None:
            return {}
        return {**self.dsde.stats(), "draft_kv": self.draft_sync.stats(),
                "plain_off_rounds": self.plain_off_rounds, **self._debug.stats()}

    def _warn_skipped_once(self) -> None:
        if self.dsde.num_skipped_signals and not self._warned_skipped:
            self._warned_skipped = True
            logger.warning(
                "DSDE: %d request round(s) had non-finite draft/target logits or no "
                "draft; their signal was skipped and their SL fell back to %d (logged "
                "once)", self.dsde.num_skipped_signals, self.dsde_initial_steps)

