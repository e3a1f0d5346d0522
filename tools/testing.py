"""Test helpers: tiny random-weight Llamas, prompt lists, and (re-exported from
``tools.serving``) the loopback SGLang server helpers.

Everything here works offline (no model hub): the tokenizer is a byte-level BPE trained
with ``tokenizers`` on a fixed in-module corpus, so every tiny model built with the same
``vocab`` shares one vocabulary (a valid STANDALONE target/draft pair).

``make_tiny_llama(path, num_layers=2, hidden=64, vocab=300, seed=0) -> path`` is the
stable entry point; it is idempotent (a folder built with the same arguments is reused).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome. "
    "Once upon a time there was a small robot who liked to count numbers: "
    "one, two, three, four, five, six, seven, eight, nine, ten. "
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"
    "Speculative decoding drafts tokens with a small model and verifies them "
    "with the large model in one pass. The quick brown fox jumps over the lazy dog. "
    "Hello, how are you today? I am fine, thank you. What is your name? "
)

#: Prompts for the tiny models' lossless tests (their tokenizer is trained on _CORPUS).
TINY_PROMPTS = [
    "Hello, how are",
    "The capital of France",
    "def add(a, b):",
    "Once upon a time there was",
    "one, two, three,",
    "Speculative decoding drafts",
    "The quick brown fox",
    "What is your name?",
]

#: Short chat questions for the SmolLM2 pair's lossless test and the shift study.
CHAT_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.", "List three fruits.", "What is 12 times 7?",
    "Write a Python function that reverses a string.", "Who wrote Romeo and Juliet?",
    "Give me a tip for learning to cook.", "What is photosynthesis?",
    "Translate 'good morning' into French.", "Why is the sky blue?", "Name a famous painting.",
    "What does HTTP stand for?", "Describe a cat in two sentences.",
    "How many days are in a leap year?", "What is the boiling point of water?",
    "Suggest a name for a pet goldfish.", "What is gravity?",
    "Write a short greeting for a birthday card.", "What is the largest planet?",
]

#: A minimal chat template (ChatML-like) so /v1/chat/completions works.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SPEC_FILE = "tiny_llama_spec.json"


def _build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(_SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(
    path,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    vocab: int = 300,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Build (or reuse) a random-weight float32 Llama HF folder at ``path``; return it.

    ``init_std`` is larger than Llama's default 0.02 so that greedy decoding has clear
    argmax margins (float32 kernel-order noise must not flip a token in lossless tests).
    Two calls with the same ``vocab`` produce models sharing one tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    spec = dict(num_layers=num_layers, hidden=hidden, vocab=vocab, seed=seed,
                init_std=init_std, version=1)
    spec_file = path / _SPEC_FILE
    if spec_file.exists():
        try:
            if json.loads(spec_file.read_text()) == spec:
                return path
        except ValueError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent if path.parent.exists() else None))
    os.chmod(tmp, 0o755)
    try:
        tokenizer = _build_tokenizer(vocab)
        heads = max(1, hidden // 16)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            head_dim=hidden // heads,
            max_position_embeddings=4096,
            initializer_range=init_std,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            torch_dtype="float32",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SPEC_FILE).write_text(json.dumps(spec))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# The loopback server helpers live in ``tools.serving``; tests import them from here.
from tools.serving import (PortInUse, ServerError, ServerProcess,  # noqa: E402,F401
                                 cpu_server_env, free_port, launch_server, running_server,
                                 server_command)
