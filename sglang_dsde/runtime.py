"""DSDE's per-server runtime: draft-distribution buffers, the signal, the policy, decisions.

Pure torch (no SGLang import): ``sglang_dsde.worker`` adapts SGLang's tensors to the calls
below and the decisions back; unit tests drive this class directly. One round goes::

    runtime.begin_round(slots)                  # row 0 of each request: its first draft
    runtime.record_draft_step(logits, steps=steps)  x (steps - 1)   # positions 1 ..
    req_steps = runtime.on_verify(slots, steps, target_logits, accept_lens, temperature)
    runtime.record_first_draft(slots, logits)   # draft-extend: next round's first draft
    steps = runtime.next_batch_steps(slots)     # the step count of the next round

Why the first draft is kept by *slot*: the distribution that proposes a request's first
draft token of round t+1 comes out of round t's draft-extend, and the batch of round t+1
may hold other requests in another order; the slot (SGLang's ``req_pool_indices``) is the
request's stable address. Later draft steps are kept by batch row.

Buffers are preallocated once (``max_rows`` rows, ``max_steps + 1`` positions, ``V``
columns) and each round views their first ``bs * (steps + 1) * V`` elements as
``[bs, steps + 1, V]``, so a round's view is contiguous whatever its step count and the
copies a CUDA graph captures write to fixed addresses for that state.

Robustness: a request whose KL is not finite (NaN/inf logits) or that drafted nothing has
its signal skipped for the round (it is fed as zero drafted tokens) and its next SL falls
back to the static length; the count of such requests travels to the host with the
decision so the worker can warn once, without an extra synchronisation.

Decisions reach the host once per round (``next_batch_steps``): without overlap
scheduling the state updated by the last verify is read directly (one sync, where the
scheduler syncs anyway); with overlap (``lag_rounds=1``) the step count decided one round
earlier is used, copied asynchronously, so the CPU never waits on the GPU. Every tensor
read is computed from rank-identical inputs (all-gathered logits, the same draft), so all
TP ranks take the same decision without a broadcast.
"""

from __future__ import annotations

import collections
from typing import Deque, Optional, Tuple

import torch

from sglang_dsde.config import DSDEConfig
from sglang_dsde.core import PolicyDriver, entropy_of_logits, kl_per_position


class DSDERuntime:
    """Everything DSDE keeps per server: buffers by slot and row, policy state, decisions."""

    def __init__(self, cfg: DSDEConfig, *, max_slots: int, max_rows: int, vocab_size: int,
                 initial_steps: int, device="cpu", logits_dtype=torch.float32,
                 lag_rounds: int = 0, min_runnable_steps: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.vocab_size = int(vocab_size)
        self.max_rows = int(max_rows)
        self.initial_steps = int(initial_steps)
        self.lag_rounds = int(lag_rounds)
        #: The smallest step count the engine can run (its pre-built states start there:
        #: 0 is the no-drafting state): a policy's decision below it runs as this many.
        self.min_runnable_steps = int(min_runnable_steps)
        self.driver = PolicyDriver.build(cfg, max_slots=max_slots, device=self.device,
                                         static_steps=initial_steps,
                                         min_runnable_steps=min_runnable_steps)
        self.policy = self.driver.policy
        width = cfg.max_steps + 1
        #: The distribution that proposes each slot's next first draft token.
        self.slot_first_draft = torch.zeros(max_slots, self.vocab_size, dtype=logits_dtype,
                                            device=self.device)
        #: Flat storage for ``[bs, steps + 1, V]`` views of this round's draft logits.
        self._round_draft = torch.zeros(self.max_rows * width * self.vocab_size,
                                        dtype=logits_dtype, device=self.device)
        #: Slots that hold a live request (allocated and not yet freed).
        self.slot_in_use = torch.zeros(max_slots, dtype=torch.bool, device=self.device)
        self._next_step = 0
        self._pending: Deque[Tuple[torch.Tensor, Optional[object]]] = collections.deque()
        # Host-side counters, updated when a decision is read (never in the round path).
        self.num_rounds = 0
        self.num_skipped_signals = 0  # request-rounds whose signal was skipped
        self.last_cap = -1
        self.last_batch_steps = self.initial_steps
        self.batch_steps_histogram: dict = {}
        #: ``(batch size, steps, host clock, catch-up tokens)`` of the decode round in
        #: flight (timing).
        self._round_clock: Optional[Tuple[int, int, float, int]] = None
        #: Step counts whose first (warm-up) round has run; see ``on_decode_round_start``.
        self._warm_steps: set = set()

    # -- request lifetime -------------------------------------------------------------

    def on_slots_allocated(self, slots: torch.Tensor) -> None:
        """A new request took each slot: fresh policy state, no first draft yet."""
        slots = slots.to(self.device, torch.int64)
        self.driver.admit(slots)
        self.slot_in_use[slots] = True

    def on_slots_freed(self, slots: torch.Tensor) -> None:
        """Requests finished or were aborted: forget them (also reset at reuse)."""
        slots = slots.to(self.device, torch.int64)
        self.driver.release(slots)
        self.slot_in_use[slots] = False

    # -- one round ----------------------------------------------------------------------

    def round_draft_logits(self, bs: int, steps: int) -> torch.Tensor:
        """``[bs, steps + 1, V]`` contiguous view of this round's draft logits."""
        width = steps + 1
        return self._round_draft[: bs * width * self.vocab_size].view(bs, width,
                                                                      self.vocab_size)

    def begin_round(self, slots: torch.Tensor, steps: int) -> None:
        """Before drafting: row 0 of each request is its first-draft distribution."""
        bs = int(slots.shape[0])
        if bs > self.max_rows:
            raise ValueError(f"DSDE runtime: batch of {bs} requests exceeds {self.max_rows}")
        self.begin_draft_steps()
        if bs:
            self.round_draft_logits(bs, int(steps))[:, 0].copy_(
                self.slot_first_draft[slots.to(self.device, torch.int64)])

    def begin_draft_steps(self) -> None:
        """The next ``record_draft_step`` is draft position 1 (also at graph capture)."""
        self._next_step = 1

    def record_draft_step(self, logits: torch.Tensor, *, steps: int) -> None:
        """A draft decode step's logits ``[rows, V]`` for a state of ``steps`` steps.

        ``rows`` is the batch size, or the padded size of a CUDA graph being captured: row
        b, position j lives at the same address whatever the batch size, so the copy a
        graph captures for its padded size lands where ``on_verify`` reads the real rows.
        """
        step = self._next_step
        rows = int(logits.shape[0])
        if step > steps or rows > self.max_rows or rows == 0:
            return
        self.round_draft_logits(rows, steps)[:, step].copy_(logits)
        self._next_step = step + 1

    def record_first_draft(self, slots: torch.Tensor, logits: torch.Tensor) -> None:
        """Draft-extend output ``[bs, V]``: the next first-draft distribution per slot."""
        bs = int(slots.shape[0])
        if bs:
            self.slot_first_draft[slots.to(self.device, torch.int64)] = \
                logits[:bs].to(self.slot_first_draft.dtype)

    def cut_chains(self, slots: torch.Tensor, retrieve_next_token: torch.Tensor) -> None:
        """Stop each request's verify chain after its own SL (``per_request_cut``).

        ``retrieve_next_token[b, j] = -1`` ends request b's greedy walk after node j; node 0
        is the bonus token, so a request of SL k keeps nodes ``0..k`` and can accept at
        most k drafts. Lossless; it saves no compute (the batch still drafts and verifies
        its full width) and can only lower that request's accepted tokens.
        """
        req_steps = self.driver.req_steps(slots.to(self.device, torch.int64))
        req_steps = req_steps.to(retrieve_next_token.device)
        nodes = torch.arange(retrieve_next_token.shape[1], device=retrieve_next_token.device)
        retrieve_next_token.masked_fill_(nodes.unsqueeze(0) >= req_steps.unsqueeze(1), -1)

    def on_verify(self, slots: torch.Tensor, steps: int, target_logits: torch.Tensor,
                  accept_lens: torch.Tensor, temperature: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
        """Feed one verify round; return each request's SL for its next round ``[bs]``
        (at least ``min_runnable_steps``).

        ``target_logits``: ``[bs * (steps + 1), V]``, row ``b * (steps + 1) + j`` the target
        distribution after node j; ``accept_lens``: accepted drafts + 1 (the bonus).
        """
        bs = int(slots.shape[0])
        slots = slots.to(self.device, torch.int64)
        if bs == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        width = steps + 1
        target = target_logits.reshape(bs, width, self.vocab_size)
        draft = self.round_draft_logits(bs, steps)
        num_drafted = torch.full((bs,), steps, dtype=torch.int64, device=self.device)
        # The KL is computed for every policy: it is reported (meta_info ``dsde_kl``) and
        # tells a non-finite round from a usable one.
        with_entropy = self.policy.needs_draft_entropy
        out = kl_per_position(target, draft, num_drafted, temperature,
                              with_draft_entropy=with_entropy)
        kl, entropy = out if with_entropy else (out, None)
        kl = kl[:, :steps]
        entropy = entropy[:, :steps] if entropy is not None else None
        num_accepted = (accept_lens.to(self.device, torch.int64) - 1).clamp(0, steps)
        # A round of 0 steps (the no-drafting state) has nothing to check; non-finite
        # logits skip the request's signal and its SL falls back (the policy's preamble).
        decision = self.driver.observe(slots, num_drafted, num_accepted, kl=kl,
                                       temperature=temperature, draft_entropy=entropy)
        req_steps = decision.req_steps
        #: ``[bs]`` mean KL of each request's drafted positions this round (NaN: skipped).
        usable = torch.isfinite(kl).all(dim=1) & (num_drafted > 0)
        self.last_req_mean_kl = torch.where(usable, kl.mean(dim=1), float("nan"))
        self.num_rounds += 1
        self._push_decision(torch.stack([req_steps.max(), decision.num_skipped, decision.cap]))
        # Reported as what will run (meta_info ``dsde_sl``): below the engine's smallest
        # pre-built state a request drafts ``min_runnable_steps``.
        return req_steps.clamp_min(self.min_runnable_steps)

    # -- decisions to the host --------------------------------------------------------

    def _push_decision(self, packed: torch.Tensor) -> None:
        if self.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
        else:
            self._pending.append((packed, None))
        # Decisions nobody asked for (rounds without a next_batch_steps call) are still
        # counted; they are at least lag + 1 rounds old, so reading them does not wait.
        self._read_pending(keep=self.lag_rounds + 1)

    def next_batch_steps(self, slots: torch.Tensor, pending_catch_up: float = 0.0) -> int:
        """The step count for a batch about to draft (the round's one host read).

        Without lag: the policy's batch decision (``batch_steps_for``: by default the
        largest current SL over the batch; new requests count with the initial SL). With
        ``lag_rounds`` = 1: the previous round's decision. Clamped into
        ``[min_runnable_steps, max_steps]``. A policy that reads the first draft's entropy
        gets it here, from the distributions kept by slot. ``pending_catch_up``: the
        catch-up tokens the round pays if it drafts (``core.round_cost``).
        """
        slots = slots.to(self.device, torch.int64)
        self.driver.observe_pending_catch_up(pending_catch_up)
        if self.policy.needs_first_entropy and slots.shape[0]:
            self.driver.observe_first_entropy(
                slots, entropy_of_logits(self.slot_first_draft[slots]))
        if self.lag_rounds == 0:
            self._read_pending(keep=0)
            steps = int(self.driver.plan(slots)) if slots.shape[0] else self.initial_steps
        else:
            if len(self._pending) <= self.lag_rounds:
                steps = self.initial_steps
            else:
                steps = self._read_pending(keep=self.lag_rounds)
        steps = min(max(steps, self.min_runnable_steps), self.cfg.max_steps)
        self.batch_steps_histogram[steps] = self.batch_steps_histogram.get(steps, 0) + 1
        self.last_batch_steps = steps
        return steps

    # -- round timing (host clock) ------------------------------------------------------

    def on_decode_round_start(self, batch_size: int, steps: int, now: float) -> None:
        """A decode round starts at host time ``now`` (seconds). The time since the
        previous decode round started, when nothing else ran in between, is that round's
        cost; the policy learns its round-cost model from it (``observe_round``)."""
        previous = self._round_clock
        # The first round a runtime state runs pays one-off work (lazy buffers, first
        # kernels: many times a round); as a cost sample it would make that step count
        # look expensive for hundreds of rounds, so it is not one.
        if previous is not None and previous[1] in self._warm_steps:
            self.driver.observe_cost(previous[0], previous[1], now - previous[2],
                                     previous[3])
        if previous is not None:
            self._warm_steps.add(previous[1])
        self._round_clock = (int(batch_size), int(steps), float(now), 0)

    def on_catch_up(self, tokens: int) -> None:
        """The decode round in flight first ran a catch-up of ``tokens`` draft tokens
        (part of its cost)."""
        if self._round_clock is not None:
            self._round_clock = self._round_clock[:3] + (int(tokens),)

    def on_other_work(self) -> None:
        """Something other than a decode round ran (a prefill, an idle period): the gap
        to the next decode round is not a round's cost."""
        self._round_clock = None

    def _read_pending(self, keep: int) -> int:
        """Read decisions older than the newest ``keep``; return the last one's steps."""
        steps = self.initial_steps
        while len(self._pending) > keep:
            host, event = self._pending.popleft()
            if event is not None:
                event.synchronize()
            steps, skipped, self.last_cap = (int(v) for v in host.tolist())
            self.num_skipped_signals += skipped
        return steps

    def stats(self) -> dict:
        """DSDE's state for humans (``/server_info``): host counters and slot occupancy."""
        return {
            "policy": self.cfg.policy,
            "live_slots": int(self.slot_in_use.sum()),
            "rounds": self.num_rounds,
            "skipped_signals": self.num_skipped_signals,
            "last_batch_steps": self.last_batch_steps,
            "last_cap": self.last_cap,
            "batch_steps_histogram": {str(k): v for k, v in
                                      sorted(self.batch_steps_histogram.items())},
            **({"learned": learned} if (learned := self.policy.describe()) else {}),
        }
