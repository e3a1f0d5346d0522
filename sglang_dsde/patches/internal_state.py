"""Touch-point: ``/server_info``'s scheduler state, so DSDE's state is visible over HTTP.

Read against SGLang 0.5.23 (``srt/managers/scheduler_components/internal_state.py``:
``SchedulerInternalStateController._add_speculative(state)`` fills the speculative part of
``internal_states`` that ``GET /server_info`` returns). An AFTER hook adds
``state["dsde"]`` from the spec worker's ``dsde_stats()`` when the worker has one (the DSDE
worker does; any other algorithm is left untouched). The hook replaces the method on the
class, so instances created before the plugin loaded in a scheduler process see it too.
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

SGLANG_VERSION_READ = "0.5.23"
HOOKED_SYMBOLS = (
    "sglang.srt.managers.scheduler_components.internal_state."
    "SchedulerInternalStateController._add_speculative",
)



def apply() -> None:
    register_once(__name__, [(HOOKED_SYMBOLS[0], _add_dsde_state, "AFTER")])


def _add_dsde_state(_result, controller, state) -> None:
    worker = getattr(controller.scheduler, "draft_worker", None)
    stats = getattr(worker, "dsde_stats", None)
    if callable(stats):
        state["dsde"] = stats()
