"""The adapter between SGLang's speculative path and DSDE: the one place outside
``patches/`` that touches ``sglang.srt`` internals (read against SGLang 0.5.23).

* ``spec_algo``: ``DSDESpecAlgo`` (how SGLang's scheduler sees ``--speculative-algorithm
  DSDE``) and ``worker_factory``, which imports the worker class lazily (its base class
  imports SGLang's model stack);
* ``v2``: ``DSDEWorkerV2``, STANDALONE's V2 worker plus DSDE's signal, policy and step
  switching (``sglang_dsde.runtime`` does the maths);
* ``ragged``: the ragged verify (each request verifies its own length) through SGLang's
  ``RaggedVerifyLayout``;
* ``exact_penalties``: penalised requests verify one token per round (lossless);
* ``aligned``: ``DSDEDraftWorker``, STANDALONE's draft worker with the draft seeing each
  token at its own position, and the catch-up extend; ``draft_sync``: where each
  request's draft KV is valid (``sglang_dsde.draft_kv``), the catch-up's trigger, the
  off rounds' bookkeeping; ``off_round``: an off round's verify by a plain target decode
  (no graphs); ``round_debug``: per-server round diagnostics.

``HOOKED_SYMBOLS`` lists every SGLang object this package subclasses, overrides, calls or
wraps at run time; ``tests/integration/test_patch_symbols.py`` resolves each against the
installed SGLang, so an upgrade that moves one fails there.
"""

from .spec_algo import DSDESpecAlgo, worker_factory

SGLANG_VERSION_READ = "0.5.23"

HOOKED_SYMBOLS = (
    # spec_algo: the scheduler's view of the algorithm
    "sglang.srt.speculative.spec_info.CustomSpecAlgo",
    "sglang.srt.speculative.spec_info.CustomSpecAlgo.resolve_max_speculative_num_draft_tokens",
    "sglang.srt.managers.overlap_utils.FutureMap",
    "sglang.srt.arg_groups.overrides.resolution_result",
    # v2: the worker's base class and the methods it overrides
    "sglang.srt.speculative.standalone_worker_v2.StandaloneWorkerV2",
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.forward_batch_generation",
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.verify",
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.init_cuda_graphs",
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.apply_runtime_state",
    "sglang.srt.speculative.adaptive_runtime_state.AdaptiveController",
    "sglang.srt.speculative.adaptive_runtime_state.AdaptiveController.init_states",
    # v2: the runtime states, their switch log line and their overrides-log entries
    "sglang.srt.speculative.eagle_worker_v2.logger",
    "sglang.srt.runtime_context.get_context",
    "sglang.srt.runtime_context.RuntimeContext._overrides_log",
    # v2: TP ranks share rank 0's round-cost sample
    "sglang.srt.layers.dp_attention.get_dp_tp_group",
    "sglang.srt.distributed.parallel_state.GroupCoordinator.broadcast",
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2.activate_step_by_batch",
    "sglang.srt.speculative.eagle_worker_v2.EAGLEWorkerV2._stub_skipped_draft_extend",
    # aligned: the draft worker's class and the methods it overrides or calls
    "sglang.srt.speculative.standalone_worker_v2.StandaloneDraftWorker",
    "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker.draft",
    "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker._draft_extend_for_prefill",
    "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker._draft_extend_for_decode",
    "sglang.srt.mem_cache.kv_index_translator.KVIndexTranslator.plan_uniform_extend",
    "sglang.srt.mem_cache.kv_loc_plan.KVLocPlan.bind",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.EXTEND",
    # off_round: a plain target decode for an off round (a mixin before SGLang's worker)
    "sglang.srt.managers.utils.GenerationBatchResult",
    "sglang.srt.speculative.eagle_info.EagleDraftInput",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode.DECODE",
    "sglang.srt.runtime_context.get_parallel",
    # aligned: objects of each runtime state wrapped to shift the draft loop's batch
    "sglang.srt.speculative.eagle_draft_cuda_graph_runner.EAGLEDraftCudaGraphRunner.execute",
    # v2: objects wrapped on the running instances
    "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.register_on_alloc_rows",
    "sglang.srt.mem_cache.memory_pool.ReqToTokenPool._on_alloc_rows",
    "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free_rows",
    "sglang.srt.model_executor.model_runner.ModelRunner.forward",
    "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker.draft_forward",
    "sglang.srt.speculative.eagle_draft_extend_cuda_graph_runner."
    "EAGLEDraftExtendCudaGraphRunner.execute",
    # ragged: the packed target verify through SGLang's layout
    "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation",
    "sglang.srt.speculative.ragged_verify.RaggedVerifyLayout",
    "sglang.srt.speculative.spec_info.SpecInput.ragged_verify_layout",
    "sglang.srt.managers.schedule_batch.ScheduleBatch.has_grammar",
    # exact_penalties: req.sampling_params (penalties, min_new_tokens), req.output_ids,
    # batch.reqs and the verify input's retrieve_next_token
    "sglang.srt.sampling.sampling_params.SamplingParams",
    "sglang.srt.managers.schedule_batch.Req",
    "sglang.srt.managers.schedule_batch.ScheduleBatch",
    "sglang.srt.speculative.eagle_info.EagleVerifyInput",
)

__all__ = ["DSDESpecAlgo", "HOOKED_SYMBOLS", "SGLANG_VERSION_READ", "worker_factory"]
