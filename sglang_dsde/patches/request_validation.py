"""Touch-point: request validation, so a malformed prompt gets a 400, not a dead server.

Read against SGLang 0.5.23. ``TokenizerManager._validate_one_request(obj, input_ids)``
(``srt/managers/tokenizer_manager.py``) checks every tokenized generate / embedding request
(lengths, features) before it reaches the scheduler; a ``ValueError`` raised there becomes
HTTP 400 (``srt/entrypoints/http_server.py``, ``_create_error_response``; the OpenAI routes
do the same). It does not check the token ids themselves, and the scheduler process trusts
them:

* an empty prompt (``text: ""`` with a tokenizer that adds no BOS, or ``input_ids: []``)
  becomes a zero-token extend, and the model forward raises ``cannot reshape tensor of 0
  elements``;
* an id outside ``[0, vocab_size)`` indexes past the embedding table (``IndexError`` on
  CPU, a device-side assert on GPU).

Both happen in SGLang's own model path, with or without speculation (a plain server dies
the same way), and an exception in the scheduler process ends the server. A BEFORE hook
adds the two checks to the validation SGLang already runs. Requests with multimodal data
or ``input_embeds`` are left alone (their ``input_ids`` may carry placeholder values).
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

SGLANG_VERSION_READ = "0.5.23"
HOOKED_SYMBOLS = (
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
)

_MULTIMODAL_FIELDS = ("input_embeds", "image_data", "audio_data", "video_data")


def apply() -> None:
    register_once(__name__, [(HOOKED_SYMBOLS[0], _check_token_ids, "BEFORE")])


def check_prompt_ids(input_ids, vocab_size: int) -> None:
    """Raise ``ValueError`` (HTTP 400) for an empty prompt or an id outside the vocabulary."""
    if len(input_ids) == 0:
        raise ValueError("The prompt is empty (0 tokens): give text or input_ids with at "
                         "least one token.")
    low, high = min(input_ids), max(input_ids)
    if low < 0 or high >= vocab_size:
        index, bad = next((i, t) for i, t in enumerate(input_ids)
                          if not 0 <= t < vocab_size)
        raise ValueError(f"input_ids[{index}] = {bad}: expected a token id in "
                         f"[0, {vocab_size}) (the model's vocab_size).")


def _check_token_ids(manager, obj, input_ids, *args, **kwargs) -> None:
    if input_ids is None or any(getattr(obj, f, None) is not None for f in _MULTIMODAL_FIELDS):
        return
    vocab_size = getattr(getattr(manager, "model_config", None), "vocab_size", None)
    if not isinstance(vocab_size, int):
        return
    check_prompt_ids(input_ids, vocab_size)
