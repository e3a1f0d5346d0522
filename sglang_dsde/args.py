"""Server-argument handling for ``--speculative-algorithm DSDE``.

SGLang calls these through its plugin contract (``validate_server_args`` and the spec
class's ``handle_server_args``, ``srt/arg_groups/speculative_hook.py``) with a stand-in of
``ServerArgs`` that reads the resolved values and records every field we assign. Both run
during argument resolution, before any model is loaded, so a bad knob is refused there.

DSDE's own knobs travel in ``speculative_adaptive_config`` (a JSON file path or an
inline JSON object; ``--dsde-*`` flags are folded into it by ``patches/cli_args.py``):
a real ``ServerArgs`` field, so the values reach every spawned scheduler process.
No SGLang import here: only attribute reads and writes on the object SGLang hands us.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from sglang_dsde import pair_check
from sglang_dsde.config import DSDEConfig, DSDEConfigError, initial_steps_for

logger = logging.getLogger(__name__)
#: SGLang's own default for speculative decoding (``_handle_eagle_family``).
DEFAULT_MAX_RUNNING_REQUESTS = 48


def dsde_config_of(server_args: Any) -> DSDEConfig:
    """The validated DSDE config a server was launched with."""
    return DSDEConfig.from_json_source(getattr(server_args, "speculative_adaptive_config", None))


def initial_steps_of(server_args: Any, cfg: DSDEConfig) -> int:
    """The SL of a new request (``config.initial_steps_for`` over --speculative-num-steps).
    May be 0 (SGLang's no-drafting state)
    when the knob says so; ``static_steps_of`` is what SGLang's static state gets."""
    return initial_steps_for(cfg, getattr(server_args, "speculative_num_steps", None))


def static_steps_of(server_args: Any, cfg: DSDEConfig) -> int:
    """``--speculative-num-steps`` as SGLang needs it (at least 1: its static runtime
    state drafts); with an initial SL of 0 the worker starts in the step-0 state."""
    return max(1, initial_steps_of(server_args, cfg))


def validate_server_args(server_args: Any) -> None:
    """Refuse a bad DSDE launch with one line naming the flag, the value and the range."""
    cfg = dsde_config_of(server_args)
    if getattr(server_args, "speculative_draft_model_path", None) is None:
        raise DSDEConfigError(
            "--speculative-draft-model-path is required with --speculative-algorithm DSDE "
            "(a separate draft model sharing the target's vocabulary)")
    given = getattr(server_args, "speculative_num_steps", None)
    if cfg.initial_steps is not None and given is not None and given != cfg.initial_steps:
        raise DSDEConfigError(
            f"--dsde-initial-steps = {cfg.initial_steps} and --speculative-num-steps = "
            f"{given}: both set the SL of a new request with DSDE; give one of them")
    steps = initial_steps_of(server_args, cfg)
    lo = max(1, cfg.min_steps)
    if cfg.initial_steps is None and (not isinstance(steps, int)
                                      or not lo <= steps <= cfg.max_steps):
        raise DSDEConfigError(
            f"--speculative-num-steps = {steps!r}: with DSDE expected an integer in "
            f"[max(1, min_steps)={lo}, max_steps={cfg.max_steps}]")
    if cfg.initial_steps == 0 and cfg.policy in ("dsde", "adaedl"):
        raise DSDEConfigError(
            f"--dsde-initial-steps = 0: with --dsde-policy {cfg.policy} expected an integer "
            f"in [max(1, min_steps)={lo}, max_steps={cfg.max_steps}] (its warm-up grows "
            f"the SL of a request from its initial value by doubling)")
    pair_check.check_draft(server_args)
    topk = getattr(server_args, "speculative_eagle_topk", None)
    if topk not in (None, 1):
        raise DSDEConfigError(
            f"--speculative-eagle-topk = {topk!r}: DSDE drafts a single chain; expected 1")
    if getattr(server_args, "speculative_use_rejection_sampling", False):
        raise DSDEConfigError(
            "--speculative-use-rejection-sampling = True: not supported with DSDE "
            "(SGLang implements it for EAGLE/EAGLE3 only); expected False")
    if getattr(server_args, "device", None) == "cpu" and getattr(
            server_args, "enable_torch_compile", False):
        raise DSDEConfigError(
            "--enable-torch-compile = True: not supported with DSDE on CPU (the per-step "
            "runtime states have no CPU graph runner); expected False")
    if (getattr(server_args, "attn_dp_size", 1) or 1) > 1:
        raise DSDEConfigError(
            "--attn-dp-size > 1: DSDE rides the STANDALONE worker, which does not support "
            "attention data parallelism; expected 1")
    _refuse_what_runtime_state_switches_break(server_args)


#: Features SGLang refuses with its own runtime-state switching (``--speculative-
#: adaptive``: ``adaptive_spec_params.adaptive_unsupported_reason``, the LoRA and
#: HiSparse argument hooks). Those guards key on ``speculative_adaptive``, which DSDE does
#: not set, so DSDE applies them itself: (flag, field, why).
_SWITCH_INCOMPATIBLE = (
    ("--enable-lora", "enable_lora",
     "the runtime-state switch does not rebuild LoRA's CUDA-graph metadata"),
    ("--lora-paths", "lora_paths",
     "the runtime-state switch does not rebuild LoRA's CUDA-graph metadata"),
    ("--enable-hisparse", "enable_hisparse",
     "HiSparse's speculative path sizes its swap state statically"),
    ("--enable-two-batch-overlap", "enable_two_batch_overlap",
     "a runtime-state switch would discard the TboAttnBackend wrapper"),
    ("--enable-pdmux", "enable_pdmux",
     "a runtime-state switch does not update decode_attn_backend_group"),
)


def _refuse_what_runtime_state_switches_break(server_args: Any) -> None:
    for flag, field, why in _SWITCH_INCOMPATIBLE:
        value = getattr(server_args, field, None)
        if value:
            raise DSDEConfigError(
                f"{flag} = {value!r}: not supported with --speculative-algorithm DSDE, which "
                f"switches SGLang's speculative runtime states between rounds ({why}, as "
                f"SGLang says for --speculative-adaptive); expected it off")
    skip = os.environ.get("SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND", "")
    if skip.lower() in ("true", "1", "yes", "y"):
        raise DSDEConfigError(
            f"SGLANG_SPEC_SKIP_ZERO_STEP_DRAFT_EXTEND = {skip!r}: not supported with "
            f"--speculative-algorithm DSDE (it leaves the draft's KV cache and DSDE's "
            f"first-draft distributions stale after a no-drafting round); unset it")


def handle_server_args(server_args: Any) -> None:
    """Set the fields DSDE needs, the way SGLang does for STANDALONE."""
    cfg = dsde_config_of(server_args)
    initial = initial_steps_of(server_args, cfg)
    steps = static_steps_of(server_args, cfg)
    server_args.speculative_num_steps = steps
    server_args.speculative_eagle_topk = 1
    if getattr(server_args, "speculative_num_draft_tokens", None) not in (None, steps + 1):
        logger.warning("DSDE: speculative_num_draft_tokens is set to speculative_num_steps "
                       "+ 1 = %d (topk 1 drafts a chain)", steps + 1)
    server_args.speculative_num_draft_tokens = steps + 1
    if getattr(server_args, "max_running_requests", None) is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    # Overlap scheduling stays as the user set it, on a CPU too (SGLang turns it off for
    # its own speculative algorithms there): patches/cpu_spec_overlap.py supplies the one
    # GPU kernel its speculative relay needs, and without it this CPU decodes ~30% slower.
    graphs = getattr(server_args, "cuda_graph_config", None)
    if getattr(server_args, "device", None) == "cpu" and graphs is not None:
        # SGLang's CPU engine captures no decode graphs (without torch.compile); say so
        # in the resolved config too, or the per-step runtime states would build CUDA
        # graph runners for it.
        graphs = copy.deepcopy(graphs)
        graphs.decode.backend = "disabled"
        server_args.cuda_graph_config = graphs
    if getattr(server_args, "enable_mixed_chunk", False):
        logger.warning("DSDE: mixed chunked prefill is disabled (STANDALONE does not "
                       "support it)")
        server_args.enable_mixed_chunk = False
    logger.info("DSDE: initial SL %d, SL range [%d, %d], policy %s, window %d", initial,
                cfg.min_steps, cfg.max_steps, cfg.policy, cfg.window)


__all__ = ["DSDEConfigError", "dsde_config_of", "handle_server_args", "initial_steps_of",
           "static_steps_of", "validate_server_args"]
