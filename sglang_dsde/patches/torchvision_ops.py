"""Stand-in: torchvision operator schemas when torchvision's C extension cannot load.

Read against SGLang 0.5.23 with torchvision 0.28.0. SGLang imports torchvision through
its multimodal configs (``srt/configs`` -> ``srt/multimodal/internvl_utils.py``) in the
launcher and in every scheduler. PyPI's torchvision wheels are CUDA builds; with the CPU
torch of a GPU-less machine their ``_C`` extension fails to load, and ``import
torchvision`` then dies in ``_meta_registrations.py`` on
``register_fake("torchvision::nms")`` (the only registrations not gated on the
extension): "operator torchvision::nms does not exist". Defining the two schemas first
lets the pure-Python parts SGLang uses (transforms) import; the operators themselves
have no kernel here and raise if called, which the text-only CPU path never does.

Runs from ``patches/early.py`` just before torchvision executes. Inert where the
extension loads (a working torchvision registers the real schemas itself).
"""

from __future__ import annotations

import glob
import importlib.util
import os

SGLANG_VERSION_READ = "0.5.23"
HOOKED_SYMBOLS = ("sglang.srt.multimodal.internvl_utils",)
#: The operators torchvision registers fake kernels for without checking its extension.
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_library = None  # keeps the torch.library.Library alive (its schemas die with it)


def apply() -> None:
    """Nothing at plugin time: the work happens at import time (``define_missing_schemas``)."""


def define_missing_schemas() -> None:
    global _library
    if _library is not None or _extension_loads():
        return
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS.values():
        _library.define(schema)


def _extension_loads() -> bool:
    """Whether torchvision's own ``_C`` extension loads (then it defines the schemas)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to stand in for
    for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(path)
            return True
        except OSError:
            return False
    return False
