"""Touch-point: SGLang's decode log line, so it shows DSDE's batch step count and cap.

Read against SGLang 0.5.23: ``SchedulerMetricsReporter.report_decode_stats`` logs one
``Decode batch, #running-req: ..., accept len: ..., cap len: ...`` line per
``--decode-log-interval`` through the module logger of
``srt/managers/scheduler_components/metrics_reporter.py`` ("cap len" is the mean
per-request SL DSDE reports as ``cap_lens``). A ``logging.Filter`` on that logger appends
``dsde steps: <last batch step count>, dsde cap: <last cap or none>`` to those lines; it
changes nothing else and is inert until a DSDE worker attaches its stats.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

SGLANG_VERSION_READ = "0.5.23"
LOGGER_MODULE = "sglang.srt.managers.scheduler_components.metrics_reporter"
HOOKED_SYMBOLS = (LOGGER_MODULE + ".logger",)
_PREFIX = "Decode batch"

_stats: Optional[Callable[[], dict]] = None
_applied = False


class _DSDEDecodeLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _stats is not None and isinstance(record.msg, str) and \
                record.msg.startswith(_PREFIX):
            stats = _stats()
            cap = stats.get("last_cap", -1)
            record.msg += (f", dsde steps: {stats.get('last_batch_steps')}, "
                           f"dsde cap: {cap if cap >= 0 else 'none'}")
        return True


def apply() -> None:
    global _applied
    if _applied:
        return
    logging.getLogger(LOGGER_MODULE).addFilter(_DSDEDecodeLine())
    _applied = True


def attach(stats: Callable[[], dict]) -> None:
    """Called by the DSDE worker: where the line's figures come from (host values only,
    ``DSDERuntime.host_counters``: the filter runs on the scheduler's thread and must
    not read the device)."""
    global _stats
    _stats = stats
