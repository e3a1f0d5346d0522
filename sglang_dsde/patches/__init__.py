"""Adapters that reach into SGLang internals: one module per touch-point.

Each module names the SGLang release it was read against (``SGLANG_VERSION_READ``),
exposes ``apply()`` (idempotent; registers HookRegistry hooks or stand-ins, imports
SGLang lazily) and ``HOOKED_SYMBOLS`` (the dotted names it relies on), which
``tests/integration/test_patch_symbols.py`` resolves against the installed SGLang so an
upgrade that moves one fails loudly. Installed as ``sglang_dsde.patches``.
"""

from __future__ import annotations

import importlib

#: Touch-point modules, applied in this order by ``apply_all``.
TOUCH_POINTS = (
    "cli_args",
    "torchvision_ops",
    "sgl_kernel_standins",
    "cpu_spec_attention",
    "cpu_verify_sampling",
    "cpu_spec_overlap",
    "internal_state",
    "decode_log",
    "request_validation",
    "spec_metrics",
    "spec_kv_budget",
)


def touch_point_modules() -> list:
    return [importlib.import_module(f"{__name__}.{name}") for name in TOUCH_POINTS]


_REGISTERED: set = set()


def register_once(owner: str, hooks=(), *, cpu_only: bool = False) -> bool:
    """The body of a touch-point's ``apply()``: register ``hooks`` (``(dotted symbol,
    function, "BEFORE" | "AFTER" | "AROUND")``) with SGLang's ``HookRegistry`` once per
    process for ``owner`` (the module's ``__name__``), and only on a CPU when
    ``cpu_only``. Returns whether it registered now (the caller then does the rest of
    its one-time work)."""
    if owner in _REGISTERED:
        return False
    if cpu_only:
        from sglang.srt.utils.common import is_cpu

        if not is_cpu():
            return False
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for symbol, function, kind in hooks:
        HookRegistry.register(symbol, function, getattr(HookType, kind))
    _REGISTERED.add(owner)
    return True


def apply_all() -> None:
    """Apply every touch-point; each one is idempotent, so this is too."""
    for module in touch_point_modules():
        module.apply()
