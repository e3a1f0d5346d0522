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
  runnable step count (``config.state_steps_for``: ``--dsde-state-steps`` plus the
  initial SL; SGLang's own mechanism, CUDA-graph safe), each capturing the graph batch
  sizes ``states.graph_batch_sizes`` keeps for it, switched between rounds to the
  runtime's decision; a switch keeps nothing (``apply_runtime_state``);
* slot lifetime: the request pool's allocation hook resets a slot, ``free_rows`` clears it
  (host ints; the runtime applies them on its next call, without a host sync);
* TP > 1: the runtime shares rank 0's round-cost sample over the TP group
  (``GroupCoordinator.broadcast``), so every rank decides the same (docs/gpu.md).

Every SGLang object used here is listed in ``sglang_dsde.worker.HOOKED_SYMBOLS``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, List, Optional

import torch
from sglang.srt.arg_groups.overrides import resolution_result
from sglang.srt.speculative.adaptive_runtime_state import AdaptiveController
from sglang.srt.speculative.standalone_worker_v2 import StandaloneWorkerV2

from sglang_dsde import args, states
from sglang_dsde.config import initial_steps_for, state_steps_for
from sglang_dsde.runtime import DSDERuntime
from sglang_dsde.worker import exact_penalties
from sglang_dsde.worker.aligned import DSDEDraftWorker, wrap_draft_state
from sglang_dsde.worker.draft_sync import DraftSync
from sglang_dsde.worker.off_round import OffRoundDecode
from sglang_dsde.worker.round_debug import RoundDebug

from . import ragged
from .ragged import RaggedVerify

logger = logging.getLogger(__name__)
#: The SGLang logger that announces each runtime-state switch (one INFO line each).
_SWITCH_LOGGER = "sglang.srt.speculative.eagle_worker_v2"
#: ``_overrides_log`` source of the entry each switch appends (``apply_runtime_state``).
_SWITCH_SOURCE = "adaptive_spec.restore"


class _StepSchedule:
    """SGLang's ``AdaptiveSpecPolicy`` protocol, answering with the runtime's decision.

    ``on_graph_bs(graph_bs)``: called once SGLang hands over the CUDA-graph batch sizes,
    before any state is built (the worker logs the states' estimated memory there)."""

    def __init__(self, candidate_steps: List[int], initial_steps: int,
                 on_graph_bs: Optional[Callable] = None):
        self._candidates = candidate_steps
        self._graph_bs: Optional[List[int]] = None
        self._on_graph_bs = on_graph_bs
        self.planned_steps = initial_steps

    @property
    def candidate_steps(self) -> List[int]:
        return self._candidates

    def set_cuda_graph_bs(self, cuda_graph_bs):
        self._graph_bs = sorted(cuda_graph_bs) if cuda_graph_bs else cuda_graph_bs
        if self._on_graph_bs is not None:
            self._on_graph_bs(self._graph_bs)

    def cuda_graph_bs_for_step(self, step: int):
        """Fewer graphs for long chains (``states.graph_batch_sizes``), as SGLang's own
        adaptive tiers prune them."""
        return states.graph_batch_sizes(self._graph_bs, step)

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


class _QuietSwitchLine(logging.Filter):
    """Drops SGLang's INFO line of a runtime-state switch while DSDE switches (DSDE
    counts its switches in ``/server_info``; a line each would flood the log)."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and str(record.msg).startswith("Switch adaptive runtime"))


_QUIET_SWITCH = _QuietSwitchLine()


@contextlib.contextmanager
def _quiet_switch_line():
    switch_logger = logging.getLogger(_SWITCH_LOGGER)
    if _QUIET_SWITCH not in switch_logger.filters:
        switch_logger.addFilter(_QUIET_SWITCH)
    _QUIET_SWITCH.active = True
    try:
        yield
    finally:
        _QUIET_SWITCH.active = False


def _trim_switch_entries(overrides_log: list) -> None:
    """Keep only the newest switch entry of SGLang's ``_overrides_log`` (in place).

    Each switch appends ``("adaptive_spec.restore", {steps, draft tokens})`` and nothing
    trims the list; readers overlay the entries in order (``resolved_server_args_dict``),
    and every switch entry sets the same two fields, so dropping all but the newest one
    leaves what they read unchanged."""
    switch_entries = [i for i, (source, _) in enumerate(overrides_log)
                      if source == _SWITCH_SOURCE]
    for i in reversed(switch_entries[:-1]):
        del overrides_log[i]


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
        cfg = self.dsde_config
        # The SL of a new request (0 allowed: SGLang's static state then has 1 step).
        self.dsde_initial_steps = initial_steps_for(cfg, self.speculative_num_steps)
        self._init_step_states()
        #: The ragged verify (each request verifies its own length), where supported.
        self._ragged: Optional[RaggedVerify] = None
        self._warned_grammar = False
        if cfg.ragged_verify:
            why_not = ragged.supported(str(self.device))
            if why_not is None:
                self._ragged = RaggedVerify()
            else:
                logger.info("DSDE: ragged verify off, every request verifies the batch's "
                            "full window: %s", why_not)
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

    def _init_step_states(self) -> None:
        """SGLang's controller over one runtime state per runnable step count (built by
        ``init_cuda_graphs``). Step 0 is SGLang's no-drafting state: a one-token verify
        (a plain decode through the verify path) plus the draft extend that keeps the
        draft's KV and the next first-draft distribution current."""
        # SGLang activates its static state (--speculative-num-steps, at least 1) first.
        candidates = sorted(set(state_steps_for(self.dsde_config, self.dsde_initial_steps))
                            | {self.speculative_num_steps})
        self._schedule = _StepSchedule(candidates, self.dsde_initial_steps,
                                       on_graph_bs=self._log_states)
        self.adaptive_controller = AdaptiveController(self, self._schedule)
        self.num_state_switches = 0

    def init_cuda_graphs(self):
        self._init_dsde_runtime()
        super().init_cuda_graphs()
        self._wrap_extend_graph_runner()
        wrap_draft_state(self._draft_worker)

    def apply_runtime_state(self, state) -> None:
        switching = state.speculative_num_steps != self.speculative_num_steps
        with _quiet_switch_line():
            super().apply_runtime_state(state)
        if switching:
            self.num_state_switches += 1
            from sglang.srt.runtime_context import get_context

            _trim_switch_entries(get_context()._overrides_log)
        self._wrap_extend_graph_runner()
        wrap_draft_state(self._draft_worker)

    def _log_states(self, graph_bs) -> None:
        """One start-up line: the runtime states and their estimated memory."""
        model_runner = self._target_worker.model_runner
        logger.info(states.describe_states(
            self._schedule.candidate_steps, graph_bs,
            int(model_runner.model_config.vocab_size),
            resolution_result(self.server_args, "attention_backend"),
            self.dsde_initial_steps))

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
            runnable_steps=self._schedule.candidate_steps,
            share=self._tp_share())
        runtime = self.dsde
        kv_pool = self.token_to_kv_pool_allocator
        self.draft_sync = sync = DraftSync(
            self, max_slots, int(kv_pool.size) + 2 * int(getattr(kv_pool, "page_size", 1)) + 1,
            self.device)

        def on_alloc_rows(rows):
            runtime.on_slots_allocated(rows)
            sync.on_slots_allocated(rows)

        if getattr(pool, "_on_alloc_rows", None) is None:
            pool.register_on_alloc_rows(on_alloc_rows)
        else:  # another owner (unified KV): call both
            previous = pool._on_alloc_rows
            pool._on_alloc_rows = lambda rows: (previous(rows), on_alloc_rows(rows))
        free_rows = pool.free_rows

        def free_rows_and_forget(indices):
            free_rows(indices)
            runtime.on_slots_freed(indices)

        pool.free_rows = free_rows_and_forget
        self._wrap_draft_runner()
        if self._ragged is not None:
            self._ragged.install(self._target_worker)
        from sglang_dsde.patches import decode_log

        decode_log.attach(runtime.host_counters)

    @staticmethod
    def _tp_share():
        """``share(t)``: rank 0's value of a small device tensor on every rank of the TP
        group that runs this batch (None on one rank). A collective on the current
        stream: the host does not wait."""
        from sglang.srt.layers.dp_attention import get_dp_tp_group

        group = get_dp_tp_group()
        if group.world_size <= 1:
            return None
        return lambda tensor: group.broadcast(tensor, src=0)

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
            verified = self._plan_ragged(batch, slots, steps)
            # Round timing for the cost-aware policy: start to start of decode rounds.
            self.dsde.on_decode_round_start(int(slots.shape[0]), steps, time.perf_counter(),
                                            verified)
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

    def defer_draft_prefill(self) -> bool:
        """Whether a prefill skips the draft's extend: while the server is off (its last
        decode round drafted nothing; a host value, the same on every TP rank), the
        prompt's draft KV is left to the catch-up of the first round that drafts, so
        requests served wholly while off never pay a draft prefill."""
        return self.dsde is not None and self._schedule.planned_steps == 0

    def _plan_ragged(self, batch, slots, steps: int) -> Optional[int]:
        """Per-request verify lengths for this round (a ragged verify) when some request
        wants fewer than the batch's ``steps``; returns the drafted tokens it verifies."""
        if self._ragged is None or steps == 0:
            return None
        if batch.has_grammar:
            if not self._warned_grammar:
                self._warned_grammar = True
                logger.info("DSDE: grammar-constrained batches verify the full window "
                            "(SGLang's grammar tree is uniform); logged once")
            return None
        # A host read of the lengths: the packed verify's shapes need them (CPU only).
        lengths = self.dsde.round_lengths(slots).clamp(0, steps).tolist()
        for row in exact_penalties.penalised_rows(batch.reqs):
            lengths[row] = 0  # it accepts no draft: verify none (exact_penalties.py)
        if min(lengths) >= steps:
            return None
        self._ragged.plan(lengths, steps)
        return sum(self._ragged.lengths)

    def verify(self, batch, pp_proxy_tensors=None, grammar_barrier=None):
        live = not batch.forward_mode.is_idle() and batch.req_pool_indices.shape[0] > 0
        lengths = None
        if live and self._ragged is not None and self._ragged.lengths is not None:
            lengths = torch.tensor(self._ragged.lengths, dtype=torch.int64,
                                   device=batch.req_pool_indices.device)
            self.dsde.cut_chains(batch.req_pool_indices, batch.spec_info.retrieve_next_token,
                                 lengths)
        elif live and self.dsde_config.per_request_cut:
            self.dsde.cut_chains(batch.req_pool_indices,
                                 batch.spec_info.retrieve_next_token)
        if live:  # penalised requests verify one token per round (exact_penalties.py)
            exact_penalties.cut_penalised_chains(batch)
        try:
            result = super().verify(batch, pp_proxy_tensors=pp_proxy_tensors,
                                    grammar_barrier=grammar_barrier)
            verified_tokens = None if lengths is None else self._ragged.verified_tokens
        finally:
            if self._ragged is not None:
                self._ragged.clear()
        if not live:
            return result
        info = batch.sampling_info
        # Greedy requests (SGLang turns T=0 into top_k=1) use raw-logit distributions.
        temperature = torch.where(info.top_ks.reshape(-1) <= 1, 0.0,
                                  info.temperatures.reshape(-1).float())
        result.cap_lens = self.dsde.on_verify(
            batch.req_pool_indices, self.speculative_num_steps,
            result.logits_output.next_token_logits, result.accept_lens, temperature,
            verified_tokens=verified_tokens, num_drafted=lengths)
        # Per-round values SGLang appends to each request's meta_info (customized_info).
        result.logits_output.customized_info = {
            "dsde_kl": _HostValues(self.dsde.last_req_mean_kl),
            "dsde_sl": _HostValues(result.cap_lens)}
        return result

    def dsde_stats(self) -> dict:
        """DSDE's state for ``/server_info`` (``patches/internal_state.py``)."""
        if self.dsde is None:
            return {}
        return {**self.dsde.stats(), "state_switches": self.num_state_switches,
                "runtime_states": list(self._schedule.candidate_steps),
                "draft_kv": self.draft_sync.stats(),
                "plain_off_rounds": self.plain_off_rounds, **self._debug.stats()}

    def _warn_skipped_once(self) -> None:
        if self.dsde.num_skipped_signals and not self._warned_skipped:
            self._warned_skipped = True
            logger.warning(
                "DSDE: %d request round(s) had non-finite draft/target logits or no "
                "draft; their signal was skipped and their SL fell back to %d (logged "
                "once)", self.dsde.num_skipped_signals, self.dsde_initial_steps)

