"""Early import hooks, installed at interpreter start-up by ``sglang_dsde-early.pth``.

Why a ``.pth`` and not the plugin entry point: SGLang's scheduler processes are spawned,
and unpickling their target imports SGLang modules that, at module import time, bind
names from ``sgl_kernel`` (CPU engine) and import ``torchvision`` (multimodal configs),
all before ``load_plugins()`` runs in that process. Only code that runs at interpreter
start-up is early enough. The ``.pth`` line imports this module, which must stay cheap
for every Python process of the environment: it imports nothing heavy (no torch, no
SGLang) and only puts a finder on ``sys.meta_path`` that reacts to a few module names.

``before_import(name, callback)`` runs ``callback()`` once, just before module ``name``
executes for the first time in the process. Stand-ins for kernels missing on CPU
(``patches/torchvision_ops.py``, ...) register themselves in ``_install()`` below.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Callable, Dict, List

_callbacks: Dict[str, List[Callable[[], None]]] = {}


class _BeforeImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module."""

    def find_spec(self, fullname, path, target=None):
        hooks = _callbacks.get(fullname)
        if not hooks:
            return None
        spec = _real_spec(self, fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        # Callbacks stay registered until the module executes: find_spec() alone is also
        # how libraries probe availability (transformers does, for torchvision).
        spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        for hook in _callbacks.pop(self._fullname, ()):
            hook()
        self._loader.exec_module(module)

    def __getattr__(self, name):
        # get_resource_reader, is_package, ...: whatever the wrapped loader offers.
        return getattr(self._loader, name)


def _real_spec(finder, fullname, path, target):
    for other in sys.meta_path:
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def before_import(name: str, callback: Callable[[], None]) -> None:
    """Run ``callback()`` just before module ``name`` first executes (now if already gone)."""
    if name in sys.modules:
        return
    _callbacks.setdefault(name, []).append(callback)


def _install() -> None:
    if any(isinstance(f, _BeforeImportFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeImportFinder())
    from sglang_dsde.patches import sgl_kernel_standins, torchvision_ops

    # `import sgl_kernel` -> stand-ins when the real CPU kernels are absent (only with
    # SGLANG_USE_CPU_ENGINE=1; see patches/sgl_kernel_standins.py).
    sgl_kernel_standins.install()

    before_import("torchvision", torchvision_ops.define_missing_schemas)


_install()
