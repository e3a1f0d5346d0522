"""Every SGLang symbol a patch or the worker relies on still exists: an upgrade that moves
one fails here.

Each touch-point module in ``sglang_dsde.patches``, and the worker package
(``sglang_dsde.worker``: every SGLang object it subclasses, overrides or wraps at run
time), lists its ``HOOKED_SYMBOLS`` (dotted names: a module, optionally followed by
attributes) and the release it was read against.
"""

from __future__ import annotations

import importlib

import pytest

from sglang_dsde import patches, worker

MODULES = patches.touch_point_modules() + [worker]


def symbol_exists(name: str) -> bool:
    """Import the longest importable module prefix, then walk the attributes (a class
    attribute whose default is None exists too)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_touch_point_declares_its_release_and_symbols():
    assert MODULES, "no touch-point modules"
    for module in MODULES:
        assert module.SGLANG_VERSION_READ == "0.5.23", module.__name__
        assert isinstance(module.HOOKED_SYMBOLS, tuple) and module.HOOKED_SYMBOLS, module.__name__
        assert module is worker or callable(module.apply), module.__name__


@pytest.mark.parametrize("symbol", [s for m in MODULES for s in m.HOOKED_SYMBOLS])
def test_hooked_symbol_exists_in_installed_sglang(symbol):
    assert symbol_exists(symbol), f"{symbol} moved or vanished in the installed SGLang"


def test_installed_sglang_is_the_release_the_patches_were_read_against():
    import sglang

    assert sglang.__version__ == "0.5.23"
