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
earlier is used, copied asynchronously, so the CPU never waits on the GPU. A decision is
always one of the step counts the engine has a runtime state for (``runnable_steps``).

No host-to-device copy from pageable memory and no host sync happens anywhere else: the
round's measured cost and the slots of requests that joined or left are host values,
staged through pinned memory (``staging.HostToDevice``). The slot hooks only record the
slots on the host; the runtime applies them at its next call from the worker's forward
path, on the forward stream, before anything reads those slots.

TP ranks: every input of the policy is rank-identical (all-gathered logits, the same
draft, the same accept lengths, the same batches) except the round time, which each rank
reads from its own clock. ``share`` (given by the worker under TP > 1) broadcasts rank 0's
cost sample, a device tensor, to the other ranks before the policy sees it: one small
collective enqueued on the stream, no host wait. So every rank runs the same policy on
the same inputs and takes the same decisions (docs/gpu.md).
"""

from __future__ import annotations

import collections
from typing import Callable, Deque, List, Optional, Sequence, Tuple

import torch

from sglang_dsde.config import DSDEConfig
from sglang_dsde.core import PolicyDriver, entropy_of_logits, kl_per_position
from sglang_dsde.core.round_cost import round_sample_values
from sglang_dsde.staging import HostToDevice


class DSDERuntime:
    """Everything DSDE keeps per server: buffers by slot and row, policy state, decisions."""

    def __init__(self, cfg: DSDEConfig, *, max_slots: int, max_rows: int, vocab_size: int,
                 initial_steps: int, device="cpu", logits_dtype=torch.float32,
                 lag_rounds: int = 0, runnable_steps: Optional[Sequence[int]] = None,
                 share: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.vocab_size = int(vocab_size)
        self.max_rows = int(max_rows)
        self.initial_steps = int(initial_steps)
        self.lag_rounds = int(lag_rounds)
        #: ``share(t) -> t``: rank 0's value of a small device tensor on every TP rank
        #: (None: one rank). Applied to the round-cost sample, the one input a rank reads
        #: from its own clock.
        self.share = share
        self._stage = HostToDevice(self.device)
        self.driver = PolicyDriver.build(cfg, max_slots=max_slots, device=self.device,
                                         static_steps=initial_steps,
                                         runnable_steps=runnable_steps)
        #: Step counts the engine can run (its pre-built states; 0 is the no-drafting
        #: state), sorted: every batch decision is one of them.
        self.runnable_steps = self.driver.runnable_steps
        self.min_runnable_steps = self.runnable_steps[0]
        self.policy = self.driver.policy
        width = cfg.max_steps + 1
        #: The distribution that proposes each slot's next first draft token.
        self.slot_first_draft = torch.zeros(max_slots, self.vocab_size, dtype=logits_dtype,
                                            device=self.device)
        #: Flat storage for ``[bs, steps + 1, V]`` views of this round's draft logits.
        self._round_draft = torch.zeros(self.max_rows * width * self.vocab_size,
                                        dtype=logits_dtype, device=self.device)
        #: Slots that hold a live request (allocated and not yet freed); host-side.
        self.slot_in_use = torch.zeros(max_slots, dtype=torch.bool)
        #: Slot events recorded by the hooks, applied at the next round-path call:
        #: ``[(admitted?, [slots])]`` in order.
        self._slot_events: List[Tuple[bool, List[int]]] = []
        self._next_step = 0
        #: Decisions on their way to the host: ``(packed, event, lengths)``, ``lengths``
        #: the policy's per-slot SLs as that decision left them (None without per-request
        #: lengths: no ragged verify, no cut).
        self._pending: Deque[Tuple[torch.Tensor, Optional[object], Optional[torch.Tensor]]] = \
            collections.deque()
        #: Only a lagged decision needs them (without lag a round plans afresh).
        self._keeps_lengths = self.lag_rounds > 0 and bool(cfg.ragged_verify
                                                           or cfg.per_request_cut)
        #: The per-slot SLs of the decision the coming round runs (None: the policy's
        #: current ones); see ``round_lengths``.
        self._round_lengths: Optional[torch.Tensor] = None
        # Host-side counters, updated when a decision is read (never in the round path).
        self.num_rounds = 0
        self.num_skipped_signals = 0  # request-rounds whose signal was skipped
        #: Request-rounds verified, target tokens verified over them (the mean verify
        #: width per request is their ratio), and what full windows would have verified.
        self.request_rounds = 0
        self.verified_tokens = 0
        self.window_tokens = 0
        self.last_cap = -1
        self.last_batch_steps = self.initial_steps
        self.batch_steps_histogram: dict = {}
        #: ``(batch size, steps, host clock, verified, catch-up tokens)`` of the decode
        #: round in flight.
        self._round_clock: Optional[list] = None
        #: Step counts whose first (warm-up) round has run; see ``on_decode_round_start``.
        self._warm_steps: set = set()

    # -- request lifetime -------------------------------------------------------------

    def on_slots_allocated(self, slots: Sequence[int]) -> None:
        """A new request took each slot (host ints): fresh policy state, applied before
        the runtime next touches a slot."""
        self._record_slot_event(True, slots)

    def on_slots_freed(self, slots: Sequence[int]) -> None:
        """Requests finished or were aborted (host ints): forget them (also reset at
        reuse)."""
        self._record_slot_event(False, slots)

    def _record_slot_event(self, admitted: bool, slots) -> None:
        slots = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor)
                                  else slots)]
        if not slots:
            return
        self.slot_in_use[slots] = admitted
        if self._slot_events and self._slot_events[-1][0] == admitted:
            self._slot_events[-1][1].extend(slots)
        else:
            self._slot_events.append((admitted, slots))

    def apply_slot_events(self) -> None:
        """Reset the policy state of the slots the hooks recorded (staged, no host sync).
        Every round-path method calls it first; the worker calls it on other forwards."""
        events, self._slot_events = self._slot_events, []
        for admitted, slots in events:
            staged = self._stage(slots, torch.int64)
            (self.driver.admit if admitted else self.driver.release)(staged)
            if admitted:  # decisions in flight give a new request its fresh length
                fresh = self.policy.req_steps[staged]
                for lengths in [e[2] for e in self._pending] + [self._round_lengths]:
                    if lengths is not None:
                        lengths[staged] = fresh

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
        self.apply_slot_events()
        self.begin_draft_steps()
        if bs and steps > 0:  # an off round drafts nothing: no row to compare
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
        """Draft-extend output ``[bs, V]``: the next first-draft distribution per slot.

        A policy that reads the first draft's entropy gets it here, once per write: a
        slot's first draft changes only here, so rounds that do not draft (the off
        state) compute no entropy."""
        bs = int(slots.shape[0])
        self.apply_slot_events()
        if bs:
            slots = slots.to(self.device, torch.int64)
            first = logits[:bs].to(self.slot_first_draft.dtype)
            self.slot_first_draft[slots] = first
            if self.policy.needs_first_entropy:
                self.driver.observe_first_entropy(slots, entropy_of_logits(first))

    def cut_chains(self, slots: torch.Tensor, retrieve_next_token: torch.Tensor,
                   lengths: Optional[torch.Tensor] = None) -> None:
        """Stop each request's verify chain after its own SL (``per_request_cut``, and a
        ragged verify with its round's ``lengths``).

        ``retrieve_next_token[b, j] = -1`` ends request b's greedy walk after node j; node 0
        is the bonus token, so a request of SL k keeps nodes ``0..k`` and can accept at
        most k drafts. Lossless; it saves no compute (the batch still drafts and verifies
        its full width) and can only lower that request's accepted tokens.
        """
        if lengths is None:
            lengths = self.round_lengths(slots)
        req_steps = lengths.to(retrieve_next_token.device)
        nodes = torch.arange(retrieve_next_token.shape[1], device=retrieve_next_token.device)
        retrieve_next_token.masked_fill_(nodes.unsqueeze(0) >= req_steps.unsqueeze(1), -1)

    def on_verify(self, slots: torch.Tensor, steps: int, target_logits: torch.Tensor,
                  accept_lens: torch.Tensor, temperature: Optional[torch.Tensor] = None,
                  verified_tokens: Optional[int] = None,
                  num_drafted: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed one verify round; return each request's SL for its next round ``[bs]``
        (at least ``min_runnable_steps``).

        ``target_logits``: ``[bs * (steps + 1), V]``, row ``b * (steps + 1) + j`` the target
        distribution after node j; ``accept_lens``: accepted drafts + 1 (the bonus);
        ``verified_tokens``: target tokens the round verified over the batch (host int;
        default every request's full window, ``bs * (steps + 1)``); ``num_drafted``:
        ``[bs]`` drafts each request was verified on (a ragged verify; default ``steps``).
        """
        bs = int(slots.shape[0])
        slots = slots.to(self.device, torch.int64)
        self.apply_slot_events()
        if bs == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        if steps == 0:
            return self._on_off_round(slots, verified_tokens)
        width = steps + 1
        target = target_logits.reshape(bs, width, self.vocab_size)
        draft = self.round_draft_logits(bs, steps)
        num_drafted = (torch.full((bs,), steps, dtype=torch.int64, device=self.device)
                       if num_drafted is None else num_drafted.to(self.device, torch.int64))
        # The KL is computed for every policy: it is reported (meta_info ``dsde_kl``) and
        # tells a non-finite round from a usable one.
        with_entropy = self.policy.needs_draft_entropy
        out = kl_per_position(target, draft, num_drafted, temperature,
                              with_draft_entropy=with_entropy)
        kl, entropy = out if with_entropy else (out, None)
        kl = kl[:, :steps]
        entropy = entropy[:, :steps] if entropy is not None else None
        num_accepted = torch.minimum(accept_lens.to(self.device, torch.int64) - 1,
                                     num_drafted).clamp_min(0)
        # Non-finite logits skip the request's signal and its SL falls back (the
        # policy's preamble).
        decision = self.driver.observe(slots, num_drafted, num_accepted, kl=kl,
                                       temperature=temperature, draft_entropy=entropy)
        #: ``[bs]`` mean KL of each request's drafted positions this round (NaN: skipped).
        usable = torch.isfinite(kl).all(dim=1) & (num_drafted > 0)
        self.last_req_mean_kl = torch.where(usable, kl.mean(dim=1), float("nan"))
        return self._finish_round(decision, bs, width, verified_tokens)

    def _on_off_round(self, slots: torch.Tensor, verified_tokens: Optional[int]
                      ) -> torch.Tensor:
        """A round of 0 steps (the off state): nothing drafted, so no signal to compute
        (no KL, no entropy); the policy sees every request draft nothing."""
        bs = int(slots.shape[0])
        decision = self.driver.observe_off(slots)
        self.last_req_mean_kl = torch.full((bs,), float("nan"), device=self.device)
        return self._finish_round(decision, bs, 1, verified_tokens)

    def _finish_round(self, decision, bs: int, width: int,
                      verified_tokens: Optional[int]) -> torch.Tensor:
        self.num_rounds += 1
        self.request_rounds += bs
        self.window_tokens += bs * width
        self.verified_tokens += bs * width if verified_tokens is None else int(verified_tokens)
        self._push_decision(torch.stack([self.driver.snap(decision.batch_steps),
                                         decision.num_skipped, decision.cap]),
                            self.policy.req_steps.clone() if self._keeps_lengths else None)
        # Reported as what will run (meta_info ``dsde_sl``): below the engine's smallest
        # pre-built state a request drafts ``min_runnable_steps``.
        return decision.req_steps.clamp_min(self.min_runnable_steps)

    # -- decisions to the host --------------------------------------------------------

    def _push_decision(self, packed: torch.Tensor, lengths: Optional[torch.Tensor]) -> None:
        if self.device.type == "cpu":
            self._pending.append((packed, None, lengths))
        else:
            cuda = self.device.type == "cuda"
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=cuda)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record()
            self._pending.append((host, event, lengths))
        # Decisions nobody asked for (rounds without a next_batch_steps call) are still
        # counted; they are at least lag + 1 rounds old, so reading them does not wait.
        self._read_pending(keep=self.lag_rounds + 1)

    def next_batch_steps(self, slots: torch.Tensor, pending_catch_up: float = 0.0) -> int:
        """The step count for a batch about to draft (the round's one host read).

        Without lag: the policy's batch decision (``batch_steps_for``: by default the
        largest current SL over the batch; new requests count with the initial SL). With
        ``lag_rounds`` = 1: the previous round's decision. Snapped to ``runnable_steps``
        (the largest not above it, never below the smallest). A policy that reads the
        first draft's entropy has it already (``record_first_draft``).
        ``pending_catch_up``: the catch-up tokens the round pays if it drafts (a host
        number, the same on every TP rank; ``core.round_cost``).
        """
        slots = slots.to(self.device, torch.int64)
        self.apply_slot_events()
        self.driver.observe_pending_catch_up(pending_catch_up)
        self._round_lengths = None
        if self.lag_rounds == 0:
            self._read_pending(keep=0)
            steps = int(self.driver.plan(slots)) if slots.shape[0] else self.initial_steps
        else:
            if len(self._pending) <= self.lag_rounds:
                steps = self.initial_steps  # the server's first rounds: full windows
                self._round_lengths = torch.full_like(self.policy.req_steps, steps)
            else:
                # The lengths of that same decision: the policy's current ones are a
                # newer decision's (which may draft nothing where this one drafts).
                steps, self._round_lengths = self._read_pending(keep=self.lag_rounds)
        steps = self.driver.snap_host(steps)
        self.batch_steps_histogram[steps] = self.batch_steps_histogram.get(steps, 0) + 1
        self.last_batch_steps = steps
        return steps

    # -- round timing (host clock) ------------------------------------------------------

    def on_decode_round_start(self, batch_size: int, steps: int, now: float,
                              verified: Optional[int] = None) -> None:
        """A decode round of ``batch_size`` requests drafting ``steps`` (the target
        verifying ``verified`` drafted tokens; default all) starts at host time ``now``
        (seconds). The time since the previous decode round started, when nothing else ran
        in between, is that round's cost; the policy learns its round-cost model from it
        (``observe_round``)."""
        previous = self._round_clock
        # The first round a runtime state runs pays one-off work (lazy buffers, first
        # kernels: many times a round); as a cost sample it would make that step count
        # look expensive for hundreds of rounds, so it is not one. (Every condition here
        # is a host value that is the same on every TP rank.)
        if previous is not None and previous[1] in self._warm_steps and \
                self.policy.needs_round_cost:
            sample = self._stage(round_sample_values(previous[0], previous[1],
                                                     now - previous[2], previous[3],
                                                     previous[4]),
                                 torch.float64)
            if self.share is not None:
                sample = self.share(sample)
            self.driver.observe_cost(sample)
        if previous is not None:
            self._warm_steps.add(previous[1])
        self._round_clock = [int(batch_size), int(steps), float(now), verified, 0]

    def on_catch_up(self, tokens: int) -> None:
        """The decode round in flight first ran a catch-up of ``tokens`` draft tokens
        (part of its cost)."""
        if self._round_clock is not None:
            self._round_clock[4] = int(tokens)

    def on_other_work(self) -> None:
        """Something other than a decode round ran (a prefill, an idle period): the gap
        to the next decode round is not a round's cost."""
        self._round_clock = None
        self.apply_slot_events()

    def _read_pending(self, keep: int) -> tuple:
        """Read decisions older than the newest ``keep``; return the last one's
        ``(steps, per-slot lengths or None)``."""
        steps, lengths = self.initial_steps, None
        while len(self._pending) > keep:
            host, event, lengths = self._pending.popleft()
            if event is not None:
                event.synchronize()
            steps, skipped, self.last_cap = (int(v) for v in host.tolist())
            self.num_skipped_signals += skipped
        return steps, lengths

    def round_lengths(self, slots: torch.Tensor) -> torch.Tensor:
        """``[bs]`` int64: each request's SL in the coming round (a ragged verify's
        lengths, the cut's), from the same decision as its step count: under a lagged
        decision the one ``next_batch_steps`` read, not the policy's newest (a request
        that joined since has its fresh length there too)."""
        slots = slots.to(self.device, torch.int64)
        if self._round_lengths is None:
            return self.driver.req_steps(slots)
        return self._round_lengths[slots]

    def host_counters(self) -> dict:
        """The last decision's host values (no device read: the decode log line's)."""
        return {"last_batch_steps": self.last_batch_steps, "last_cap": self.last_cap}

    def stats(self) -> dict:
        """DSDE's state for humans (``/server_info``): host counters and slot occupancy."""
        return {
            "policy": self.cfg.policy,
            "live_slots": int(self.slot_in_use.sum()),
            "rounds": self.num_rounds,
            "request_rounds": self.request_rounds,
            "verified_tokens": self.verified_tokens,
            "window_tokens": self.window_tokens,
            "skipped_signals": self.num_skipped_signals,
            "last_batch_steps": self.last_batch_steps,
            "last_cap": self.last_cap,
            "batch_steps_histogram": {str(k): v for k, v in
                                      sorted(self.batch_steps_histogram.items())},
            **({"learned": learned} if (learned := self.policy.describe()) else {}),
        }
