"""How SGLang's scheduler sees ``--speculative-algorithm DSDE`` (a ``CustomSpecAlgo``), and
the factory that hands SGLang the worker class, imported lazily: its base class imports
SGLang's model stack, which the launcher process never needs."""

from __future__ import annotations

from typing import Any, Optional

from sglang.srt.speculative.spec_info import CustomSpecAlgo

from sglang_dsde import args


class DSDESpecAlgo(CustomSpecAlgo):
    """DSDE as SGLang's scheduler sees it: STANDALONE's contract plus DSDE's arguments.

    ``is_standalone()`` is True so every STANDALONE branch of the scheduler, the model
    runner and the graph runners (draft model loading, KV sizing, no hidden-state relay)
    treats DSDE as the STANDALONE path it is. The three methods the default
    ``CustomSpecAlgo`` lacks mirror what ``SpeculativeAlgorithm`` does for STANDALONE.
    """

    def is_standalone(self) -> bool:
        return True

    def supports_grammar_overlap(self) -> bool:
        # STANDALONE inherits the EAGLE V2 verify path, grammar barrier included.
        return True

    def carries_draft_hidden_states(self) -> bool:
        # A vanilla draft LM consumes no target hidden states (EAGLE-family only).
        return False

    def need_topk(self) -> bool:
        return True

    def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens: bool = True,
                          needs_confidence_relay: bool = False):
        from sglang.srt.managers.overlap_utils import FutureMap

        return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens,
                         needs_confidence_relay)

    def handle_server_args(self, server_args: Any) -> None:
        args.handle_server_args(server_args)

    def resolve_max_speculative_num_draft_tokens(self, server_args: Any) -> Optional[int]:
        """The widest window a round writes: the largest runtime state's verify width
        (max_steps + 1, a topk 1 chain) plus one, because the aligned draft extend writes
        one slot past the verify window (``worker/aligned.py``). It sizes the per-decode
        KV reservation (twice this, absorbing the overlap scheduler's one-round lag of the
        committed length) and the verify buffers; no state verifies more than
        max_steps + 1 tokens."""
        startup = super().resolve_max_speculative_num_draft_tokens(server_args)
        widest = args.dsde_config_of(server_args).max_steps + 2
        return widest if startup is None else max(startup, widest)


def worker_factory(server_args: Any) -> type:
    """The worker class SGLang instantiates for DSDE."""
    from .v2 import DSDEWorkerV2

    return DSDEWorkerV2
