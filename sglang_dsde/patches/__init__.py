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


def apply_all() -> None:
    """Apply every touch-point; each one is idempotent, so this is too."""
    for module in touch_point_modules():
        module.apply()
