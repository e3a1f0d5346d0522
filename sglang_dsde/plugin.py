"""The ``sglang.srt.plugins`` entry point: registers ``--speculative-algorithm DSDE``.

SGLang calls ``register()`` through ``load_plugins()`` in the launcher (before argument
parsing), in ``Engine(...)`` and first thing in every spawned scheduler process, so it is
re-entrant: a module guard, and a check of SGLang's own registry in case another copy of
this module already registered the name in this process. Every SGLang import happens
inside ``register()`` and only public extension points are used here:
``SpeculativeAlgorithm.register`` and the touch-points of ``sglang_dsde.patches``
(``HookRegistry`` hooks).
"""

from __future__ import annotations

import logging

from sglang_dsde import ALGORITHM_NAME

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register DSDE with SGLang and apply the patches; harmless when called again."""
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_dsde import args, patches, worker

    patches.apply_all()
    # Outside load_plugins() (a test, a user calling register() directly) nobody else
    # applies the hooks just registered; apply_hooks() skips targets already patched.
    HookRegistry.apply_hooks()

    if not _already_registered(SpeculativeAlgorithm):
        SpeculativeAlgorithm.register(
            ALGORITHM_NAME,
            # STANDALONE's V2 worker supports the overlap scheduler; DSDE's decisions
            # under overlap lag one round and the worker accounts for it.
            supports_overlap=True,
            validate_server_args=args.validate_server_args,
            spec_class=worker.DSDESpecAlgo,
        )(worker.worker_factory)
        logger.info("sglang-dsde: registered --speculative-algorithm %s", ALGORITHM_NAME)
    _registered = True


def _already_registered(spec_algorithm_cls) -> bool:
    try:
        spec_algorithm_cls.from_string(ALGORITHM_NAME)
    except ValueError:
        return False
    return True
