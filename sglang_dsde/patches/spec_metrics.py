"""Touch-point: speculative accept metrics count the drafts each round actually proposed.

Read against SGLang 0.5.23. SGLang divides accepted drafts by ``--speculative-num-draft-
tokens - 1`` per round, a constant, wherever the rate is reported:

* per request, ``TokenizerManager._calculate_spec_decoding_metrics`` (tokenizer process):
  ``spec_num_proposed_drafts = spec_verify_ct * (speculative_num_draft_tokens - 1)`` and
  ``spec_accept_rate`` from it, with the launch-time width;
* per decode-log window, ``SchedulerMetricsReporter.report_decode_stats`` (scheduler
  process): ``accept rate`` in the ``Decode batch`` line, ``stats.spec_accept_rate`` and the
  ``sglang:spec_accept_rate`` gauge (``SchedulerMetricsCollector.log_stats``), with the
  width of the state active when the line is written.

With a step count that changes between rounds (DSDE, including its 0-draft state) both are
wrong. Each round's ``GenerationBatchResult`` carries its own verify width
(``speculative_num_draft_tokens``), so an AROUND hook on
``SchedulerBatchResultProcessor.process_batch_result_decode`` counts, before SGLang
processes the round, ``width - 1`` proposed drafts per request still running, into

* the metrics reporter (``_dsde_proposed_drafts``, reset with SGLang's window counters), from
  which the accept rate of the window is computed before ``report_decode_stats`` runs and
  written into the log line (a ``logging.Filter``), ``stats`` and the gauge (BEFORE hook on
  ``log_stats``);
* the request (a request-level ``customized_info`` entry, emitted once when a non-streamed
  request finishes), from which an AFTER hook on ``_calculate_spec_decoding_metrics`` sets
  ``spec_num_proposed_drafts`` and ``spec_accept_rate``. A streamed request's request-level
  entries are sent with its first chunk only (SGLang's streamer), so for a DSDE server the
  per-request pair is left out of a streamed request's ``meta_info`` rather than reported
  with the constant width; the server-level figures cover it.

For a static step count every figure is the one SGLang computes.
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

import logging
import re
from typing import Optional

SGLANG_VERSION_READ = "0.5.23"

_PROCESSOR = ("sglang.srt.managers.scheduler_components.batch_result_processor."
              "SchedulerBatchResultProcessor")
_REPORTER = "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter"
_COLLECTOR = "sglang.srt.observability.metrics_collector.SchedulerMetricsCollector"
_STREAMER = ("sglang.srt.managers.scheduler_components.output_streamer."
             "SchedulerOutputStreamer")
_TOKENIZER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
_LOGGER_MODULE = "sglang.srt.managers.scheduler_components.metrics_reporter"

HOOKED_SYMBOLS = (
    f"{_PROCESSOR}.process_batch_result_decode",
    f"{_REPORTER}.report_decode_stats",
    f"{_REPORTER}.reset_metrics",
    f"{_COLLECTOR}.log_stats",
    f"{_STREAMER}.is_request_level_customized_info_key",
    f"{_TOKENIZER}._calculate_spec_decoding_metrics",
    "sglang.srt.managers.utils.GenerationBatchResult",
    _LOGGER_MODULE + ".logger",
)

#: The request-level customized_info key carrying a request's proposed drafts.
REQUEST_KEY = "dsde_num_proposed_drafts"
_ACCEPT_RATE = re.compile(r"accept rate: [0-9.]+")

#: The window's accept rate while ``report_decode_stats`` runs (None otherwise).
_pending_rate: Optional[float] = None


def apply() -> None:
    if register_once(__name__, [(HOOKED_SYMBOLS[0], _count_proposed, "AROUND"),
                                (HOOKED_SYMBOLS[1], _report_true_rate, "AROUND"),
                                (HOOKED_SYMBOLS[2], _reset_proposed, "AFTER"),
                                (HOOKED_SYMBOLS[3], _gauge_true_rate, "BEFORE"),
                                (HOOKED_SYMBOLS[4], _request_level_key, "AROUND"),
                                (HOOKED_SYMBOLS[5], _per_request_true_rate, "AFTER")]):
        logging.getLogger(_LOGGER_MODULE).addFilter(_TrueAcceptRate())


# -- scheduler process -----------------------------------------------------------------


def _count_proposed(original, processor, batch, result, *args, **kwargs):
    """AROUND ``process_batch_result_decode``: count this round's proposed drafts."""
    width = getattr(result, "speculative_num_draft_tokens", None)
    if width and not batch.spec_algorithm.is_none() and not batch.forward_mode.is_idle():
        drafts = int(width) - 1
        reporter = processor.metrics_reporter
        running = [req for req in batch.reqs if not (req.is_retracted or req.finished())]
        reporter._dsde_proposed_drafts = (getattr(reporter, "_dsde_proposed_drafts", 0)
                                          + drafts * batch.batch_size())
        for req in running:
            if req.stream:
                continue  # sent with the first chunk only: see the module docstring
            if req.customized_info is None:
                req.customized_info = {}
            total = req.customized_info.get(REQUEST_KEY, [0])
            req.customized_info[REQUEST_KEY] = [total[0] + drafts]
    return original(processor, batch, result, *args, **kwargs)


def _report_true_rate(original, reporter, *args, **kwargs):
    """AROUND ``report_decode_stats``: the window's rate over the drafts proposed in it."""
    global _pending_rate
    proposed = getattr(reporter, "_dsde_proposed_drafts", None)
    if proposed is None:
        return original(reporter, *args, **kwargs)
    window_rounds = reporter.spec_num_forward_ct
    rate = reporter.spec_num_correct_drafts / proposed if proposed > 0 else 0.0
    _pending_rate = rate
    try:
        return original(reporter, *args, **kwargs)
    finally:
        _pending_rate = None
        if window_rounds and reporter.spec_num_forward_ct == 0:  # the window was reported
            reporter._dsde_proposed_drafts = 0
            stats = getattr(reporter, "stats", None)
            if stats is not None and hasattr(stats, "spec_accept_rate"):
                stats.spec_accept_rate = rate


def _reset_proposed(_result, reporter, *args, **kwargs) -> None:
    if hasattr(reporter, "_dsde_proposed_drafts"):
        reporter._dsde_proposed_drafts = 0


def _gauge_true_rate(collector, stats, *args, **kwargs) -> None:
    """BEFORE ``log_stats``: the gauge gets the window's rate."""
    if _pending_rate is not None and hasattr(stats, "spec_accept_rate"):
        stats.spec_accept_rate = _pending_rate


class _TrueAcceptRate(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _pending_rate is not None and isinstance(record.msg, str) and \
                record.msg.startswith("Decode batch"):
            record.msg = _ACCEPT_RATE.sub(f"accept rate: {_pending_rate:.2f}", record.msg)
        return True


def _request_level_key(original, streamer, key, *args, **kwargs):
    return key == REQUEST_KEY or original(streamer, key, *args, **kwargs)


# -- tokenizer process -----------------------------------------------------------------


def _per_request_true_rate(_result, manager, meta_info, recv_obj, index, *args,
                           **kwargs) -> None:
    """AFTER ``_calculate_spec_decoding_metrics``: proposed drafts as counted per round."""
    counted = meta_info.pop(REQUEST_KEY, None)
    if "spec_num_proposed_drafts" not in meta_info:
        return
    if counted:
        proposed = int(counted[-1])
        meta_info["spec_num_proposed_drafts"] = proposed
        correct = meta_info.get("spec_num_correct_drafts", 0)
        meta_info["spec_accept_rate"] = correct / proposed if proposed > 0 else 0.0
    elif _step_count_varies():
        meta_info.pop("spec_num_proposed_drafts", None)
        meta_info.pop("spec_accept_rate", None)


def _step_count_varies() -> bool:
    from sglang.srt.runtime_context import get_spec

    from sglang_dsde import ALGORITHM_NAME

    return (get_spec().speculative_algorithm or "").upper() == ALGORITHM_NAME
