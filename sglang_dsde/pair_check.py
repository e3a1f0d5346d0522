"""The draft model is checked against the target before any weights load.

SGLang's STANDALONE worker compares the two vocabularies only after both models are
loaded (``StandaloneWorkerV2._validate_vocab_compatibility``), with a message naming no
flag, and a draft path that does not exist reaches the model hub, whose error speaks of
repo ids. DSDE's ``validate_server_args`` runs during argument resolution (configs only,
no weights) and calls :func:`check_draft`, which refuses, in one line naming
``--speculative-draft-model-path`` (the path part, :func:`check_draft_path`, also runs
from ``patches/cli_args.py`` before SGLang's own resolution first reads the draft's
config):

* a path that looks like a folder (absolute, ``./``, ``~``, or more than one ``/``) and
  does not exist, or a hub-style name that is neither a folder nor cached while the hub is
  off (``HF_HUB_OFFLINE=1``);
* a draft whose ``vocab_size`` differs from the target's, or whose tokenizer maps tokens to
  other ids (both ``tokenizer.json`` files present).

Anything this module cannot read (a hub name to be downloaded later, an unusual layout) is
left to SGLang's own checks. No SGLang import: model configs are read with transformers.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from sglang_dsde.config import DSDEConfigError

FLAG = "--speculative-draft-model-path"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_draft_path(draft: Optional[str]) -> bool:
    """Refuse a draft path that names no folder; True when it is a local folder."""
    if draft is None:
        return False
    draft = str(draft)
    if os.path.exists(os.path.expanduser(draft)):
        return True
    if not _looks_like_hub_name(draft):
        raise DSDEConfigError(f"{FLAG} = {draft!r}: no such directory (expected the "
                              f"folder of a draft model sharing the target's vocabulary)")
    if _hub_offline() and not _cached_on_hub(draft):
        raise DSDEConfigError(f"{FLAG} = {draft!r}: no such directory, and not in the "
                              f"model hub cache while HF_HUB_OFFLINE=1")
    return False


def check_draft(server_args: Any) -> None:
    """Refuse a draft that cannot serve as the target's STANDALONE draft (see module)."""
    draft = getattr(server_args, "speculative_draft_model_path", None)
    target = getattr(server_args, "model_path", None)
    if not check_draft_path(draft) or target is None:
        return
    draft = str(draft)
    target_vocab, draft_vocab = _vocab_size(str(target)), _vocab_size(draft)
    if target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab:
        raise DSDEConfigError(
            f"{FLAG} = {draft!r}: vocab_size {draft_vocab}, the target's (--model-path) is "
            f"{target_vocab}; DSDE drafts with a model sharing the target's vocabulary")
    target_tokens, draft_tokens = _token_ids(str(target)), _token_ids(draft)
    if target_tokens is not None and draft_tokens is not None and target_tokens != draft_tokens:
        differing = sum(target_tokens.get(t) != draft_tokens.get(t)
                        for t in set(target_tokens) | set(draft_tokens))
        raise DSDEConfigError(
            f"{FLAG} = {draft!r}: its tokenizer maps {differing} token(s) to other ids "
            f"than the target's (--model-path); DSDE drafts with a model sharing the "
            f"target's vocabulary")


def _looks_like_hub_name(path: str) -> bool:
    if path.startswith((".", "/", "~")) or os.sep != "/" and os.sep in path:
        return False
    return bool(_HUB_NAME.match(path))


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _cached_on_hub(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return True
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _vocab_size(path: str) -> Optional[int]:
    """The text model's ``vocab_size`` from the model config, or None if unreadable."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(os.path.expanduser(path), trust_remote_code=False)
    except Exception:  # noqa: BLE001 - unreadable here: SGLang reports it later
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) else None


def _token_ids(path: str) -> Optional[dict]:
    """token -> id of a folder's ``tokenizer.json`` (added tokens included), or None."""
    file = os.path.join(os.path.expanduser(path), "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(file).get_vocab(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - unreadable here: SGLang reports it later
        return None
