"""A seeded stream of decode rounds that drives ``DSDERuntime`` as the worker does.

Requests join and leave (slot hooks, a prefill between rounds), each round asks the
runtime for its step count, times it on a clock, records the draft's distributions and
feeds the verify. Every request has its own draft quality: its drafts are the target's
distributions plus noise of a per-request scale, and a draft is accepted while its
argmax matches the target's (greedy verify). The round's time comes from a world cost
model (``LinearRoundCost``) times ``1 + jitter``.

Two properties the tests rely on: the logits, the accept lengths and the batches depend
only on ``seed`` and the decisions taken (a per-round generator), and the clock jitter
only on ``clock_seed``; so two runtimes fed the same stream with different clock seeds
see the same inputs except their round times, as two TP ranks do.
"""

from __future__ import annotations

import random
from typing import List

import torch

from sglang_dsde.core.round_cost import LinearRoundCost

#: A GPU-like world, in seconds: a draft step ~5% of a verify, ~0.5% more per request.
GPU_LIKE = LinearRoundCost.from_parts(draft_step=(5e-4, 0.0), verify=(1e-2, 5e-5),
                                      spec=(5e-4, 0.0))


class RoundStream:
    """Drives a runtime through ``rounds`` decode rounds (module docstring)."""

    def __init__(self, *, seed: int = 0, vocab: int = 64, max_slots: int = 32,
                 batch_sizes=(1, 16), mean_life: int = 40,
                 cost: LinearRoundCost = GPU_LIKE, jitter: float = 0.05):
        self.seed = seed
        self.vocab = vocab
        self.max_slots = max_slots
        self.batch_sizes = batch_sizes
        self.mean_life = mean_life
        self.cost = cost
        self.jitter = jitter

    def run(self, runtime, rounds: int, *, clock_seed: int = 0,
            on_round=None) -> List[int]:
        """The step count the runtime decided for each round (``on_round(i, steps)``
        is called after each). ``self.tokens`` / ``self.seconds``: what the rounds
        produced and cost (the stream's goodput)."""
        life = random.Random(self.seed)           # batches: the same on every "rank"
        clock_rng = random.Random(clock_seed)     # the only thing a rank has of its own
        free = list(range(self.max_slots))
        live: List[int] = []
        quality = {}
        target_bs = self.batch_sizes[0]
        clock = 0.0
        decided = []
        self.tokens, self.seconds = 0, 0.0
        for r in range(rounds):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
            if r % 50 == 0:
                target_bs = life.randint(*self.batch_sizes)
            leaving = [s for s in live if life.random() < 1.0 / self.mean_life]
            if leaving:
                runtime.on_slots_freed(leaving)
                live = [s for s in live if s not in leaving]
                free += leaving
            joining = []
            while len(live) + len(joining) < target_bs and free:
                joining.append(free.pop(0))
            if joining:
                runtime.on_slots_allocated(joining)
                for s in joining:
                    quality[s] = life.choice((0.3, 1.0, 3.0))
                # The prefill's draft extend: each new request's first draft.
                runtime.on_other_work()
                runtime.record_first_draft(torch.tensor(joining),
                                           torch.randn(len(joining), self.vocab,
                                                       generator=gen))
                live += joining
                clock += 0.05
            slots = torch.tensor(live, dtype=torch.int64)
            steps = runtime.next_batch_steps(slots)
            noise_scale = torch.tensor([quality[s] for s in live]).view(-1, 1, 1)
            runtime.on_decode_round_start(len(live), steps, clock)
            self.tokens += self._verify(runtime, slots, steps, noise_scale, gen)
            decided.append(steps)
            if on_round is not None:
                on_round(r, steps)
            jitter = 1.0 + self.jitter * clock_rng.uniform(-1.0, 1.0)
            clock += self.cost.round(len(live), steps) * jitter
            self.seconds += self.cost.round(len(live), steps)
        return decided

    def _verify(self, runtime, slots, steps: int, noise_scale, gen) -> int:
        bs, vocab = int(slots.shape[0]), self.vocab
        runtime.begin_round(slots, steps)
        draft = torch.randn(bs, steps + 1, vocab, generator=gen) * 3.0
        draft[:, 0] = runtime.slot_first_draft[slots]
        for j in range(1, steps):
            runtime.record_draft_step(draft[:, j].clone(), steps=steps)
        target = draft + noise_scale * torch.randn(bs, steps + 1, vocab, generator=gen)
        match = (draft[:, :steps].argmax(-1) == target[:, :steps].argmax(-1)).long()
        accepted = match.cumprod(dim=1).sum(dim=1) if steps else torch.zeros(bs, dtype=torch.long)
        runtime.on_verify(slots, steps, target.reshape(bs * (steps + 1), vocab),
                          accepted + 1)
        runtime.record_first_draft(slots, torch.randn(bs, vocab, generator=gen) * 3.0)
        return int(accepted.sum()) + bs


def switches(decided: List[int]) -> int:
    """Rounds whose step count differs from the round before (runtime-state switches)."""
    return sum(a != b for a, b in zip(decided, decided[1:]))


def make_goodput_runtime(device="cpu", share=None, vocab: int = 64, max_slots: int = 32,
                         lag_rounds: int = 0, **knobs):
    """The default policy on a runtime sized for ``RoundStream``."""
    from sglang_dsde.config import DSDEConfig
    from sglang_dsde.runtime import DSDERuntime

    cfg = DSDEConfig(**{"policy": "goodput", **knobs})
    return DSDERuntime(cfg, max_slots=max_slots, max_rows=max_slots, vocab_size=vocab,
                       initial_steps=4, device=device, lag_rounds=lag_rounds, share=share)



def _rank_main(rank: int, world: int, init_file: str, rounds: int, lag_rounds: int,
               share: bool, out_dir: str) -> None:
    """One "TP rank": the same stream, its own clock; rank 0's cost samples shared."""
    import json
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)

    def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0)
        return t

    runtime = make_goodput_runtime(share=broadcast_from_rank0 if share else None,
                                   lag_rounds=lag_rounds)
    decided = RoundStream(seed=0).run(runtime, rounds, clock_seed=1000 + rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(decided, fh)
    dist.destroy_process_group()


def decisions_on_ranks(*, world: int = 2, rounds: int = 1000, lag_rounds: int = 1,
                       share: bool = True) -> List[List[int]]:
    """Each rank's decisions over the same stream, ``world`` processes (torch.distributed,
    gloo), clocks jittered per rank; ``share``: the runtime broadcasts rank 0's cost
    sample, as the worker does under TP > 1."""
    import json
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "rendezvous")
        mp.start_processes(_rank_main, args=(world, init_file, rounds, lag_rounds, share,
                                             out_dir),
                           nprocs=world, join=True, start_method="spawn")
        decided = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as fh:
                decided.append(json.load(fh))
    return decided
