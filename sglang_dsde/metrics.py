"""DSDE's Prometheus series, exported with SGLang's own ``/metrics`` (``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set by
the launcher before the scheduler processes start), so series created in a scheduler
process are collected by the HTTP server's ``/metrics``. Created lazily, only when metrics
are enabled; updated with host values the worker already holds (no device reads).

* ``sglang:dsde_batch_steps`` (histogram): the step count of each decode round;
* ``sglang:dsde_rounds_total`` (counter): decode rounds DSDE decided;
* ``sglang:dsde_skipped_signals_total`` (counter): request-rounds whose signal was skipped
  (non-finite logits or no draft).
"""

from __future__ import annotations

from typing import Dict


class DSDEMetrics:
    def __init__(self, labels: Dict[str, str], max_steps: int):
        from prometheus_client import Counter, Histogram

        names = list(labels)
        self._labels = labels
        self.batch_steps = Histogram(
            "sglang:dsde_batch_steps", "Draft steps of each DSDE decode round.", names,
            buckets=[s + 0.5 for s in range(max_steps + 1)])
        self.rounds = Counter("sglang:dsde_rounds_total", "Decode rounds decided by DSDE.",
                              names)
        self.skipped = Counter("sglang:dsde_skipped_signals_total",
                               "Request-rounds whose DSDE signal was skipped.", names)
        self._skipped_seen = 0

    def observe_round(self, batch_steps: int, total_skipped: int) -> None:
        self.batch_steps.labels(**self._labels).observe(batch_steps)
        self.rounds.labels(**self._labels).inc()
        if total_skipped > self._skipped_seen:
            self.skipped.labels(**self._labels).inc(total_skipped - self._skipped_seen)
            self._skipped_seen = total_skipped
