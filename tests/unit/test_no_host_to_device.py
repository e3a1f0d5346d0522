"""The runtime's round path and slot hooks copy nothing host -> device and never wait on
the device, audited without a GPU.

``test_no_host_sync.py`` runs on the CPU, where a host-to-device copy is not an op. Here
the runtime runs on the ``meta`` device (tensors with shapes and no data), so every
tensor that crosses from the host is visible:

* a ``TorchDispatchMode`` sees every aten op: one taking a CPU tensor into a device
  tensor is a host-to-device copy (pageable, synchronous on CUDA) unless it is the
  stager's ``non_blocking`` copy (``staging.HostToDevice``, identified by its frame);
  ``_local_scalar_dense`` (``.item()``, ``int()``, a 0-dim index), ``nonzero``, boolean
  masks and blocking device-to-host copies are host syncs; the non-blocking
  device-to-host copy of the round's decision is counted (one per round) and filled with
  zeros, the value a meta tensor cannot give;
* a ``TorchFunctionMode`` sees the factory calls that copy host data to a device below
  the dispatcher (``torch.tensor(values, device=...)``, ``as_tensor``, ``new_tensor``).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sglang_dsde.config import POLICY_CHOICES, DSDEConfig
from sglang_dsde.runtime import DSDERuntime
from sglang_dsde.staging import HostToDevice

VOCAB = 48
SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item",
           "aten.repeat_interleave.Tensor", "aten.unique")
_STAGER = HostToDevice.__call__.__code__
_DECISION = DSDERuntime._push_decision.__code__


def _called_from(code) -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _tensors(obj) -> list:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class DeviceAudit(TorchDispatchMode):
    """Host-to-device copies, host syncs and device-to-host reads of ops on ``meta``."""

    def __init__(self):
        super().__init__()
        self.h2d, self.syncs, self.staged, self.reads = [], [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        inputs = _tensors((args, kwargs))
        on_device = any(t.device.type == "meta" for t in inputs)
        if name.startswith(SYNCING) and on_device:
            self.syncs.append(name)
            return 0 if name.startswith("aten._local_scalar_dense") else func(*args, **kwargs)
        if name.startswith(("aten.index", "aten._index_put")) and any(
                t.dtype == torch.bool for t in _tensors(args[1:2])):
            self.syncs.append(name + " (boolean mask)")
        if name.startswith("aten._to_copy") and on_device and \
                torch.device(kwargs.get("device") or "meta").type == "cpu":
            self.syncs.append(name + " (device-to-host copy)")
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if name.startswith("aten.copy_") and args[0].device.type == "cpu" and on_device:
            # Device -> host: only the decision, asynchronously (a meta tensor has no
            # value: the host buffer gets zeros).
            if kwargs.get("non_blocking", args[2] if len(args) > 2 else False) and \
                    _called_from(_DECISION):
                self.reads += 1
            else:
                self.syncs.append(name + " (device-to-host copy)")
            return args[0].zero_()
        cpu_in = [t for t in inputs if t.device.type == "cpu"]
        to_device = kwargs.get("device") is not None and \
            torch.device(kwargs["device"]).type == "meta"
        if cpu_in and (on_device or to_device):
            if name.startswith("aten._to_copy") and kwargs.get("non_blocking") and \
                    _called_from(_STAGER):
                self.staged += 1
            else:  # recorded before the op runs (it may refuse the mix of devices)
                self.h2d.append(f"{name} {[tuple(t.shape) for t in cpu_in]}")
        return func(*args, **kwargs)


class FactoryAudit(TorchFunctionMode):
    """Host data put on a device by a factory (below the dispatcher)."""

    def __init__(self, audit: DeviceAudit):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "")
        device = kwargs.get("device")
        if fname in ("tensor", "as_tensor") and device is not None and \
                torch.device(device).type != "cpu" and not _called_from(_STAGER):
            self.audit.h2d.append(f"torch.{fname}(..., device={device})")
        if fname == "new_tensor" and args and args[0].device.type != "cpu":
            self.audit.h2d.append("Tensor.new_tensor")
        return func(*args, **kwargs)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def drive(runtime, rounds: int) -> None:
    """The worker's call sequence (lag 1: the overlap scheduler), requests joining and
    leaving between rounds; slots and batch tensors live on the device, slot hooks get
    host ints as SGLang's request pool gives them."""
    live = [0, 3, 5]
    runtime.on_slots_allocated(live)
    runtime.on_other_work()                                    # their prefill
    runtime.record_first_draft(meta(3, dtype=torch.int64), meta(3, VOCAB))
    for r in range(rounds):
        if r == 2:
            runtime.on_slots_freed([3])
            runtime.on_slots_allocated([7, 1])
            live = [0, 5, 7, 1]
        bs = len(live)
        slots = meta(bs, dtype=torch.int64)
        steps = runtime.next_batch_steps(slots)
        runtime.on_decode_round_start(bs, steps, 0.01 * r)
        runtime.begin_round(slots, steps)
        for _ in range(1, steps):
            runtime.record_draft_step(meta(bs, VOCAB), steps=steps)
        runtime.on_verify(slots, steps, meta(bs * (steps + 1), VOCAB),
                          meta(bs, dtype=torch.int64), meta(bs))
        runtime.record_first_draft(slots, meta(bs, VOCAB))


@pytest.mark.parametrize("policy", POLICY_CHOICES)
def test_round_path_and_slot_hooks_copy_nothing_host_to_device(policy):
    cfg = DSDEConfig(policy=policy, window=4, max_steps=6)
    runtime = DSDERuntime(cfg, max_slots=8, max_rows=8, vocab_size=VOCAB, initial_steps=3,
                          device="meta", lag_rounds=1)
    audit = DeviceAudit()
    rounds = 6
    with audit, FactoryAudit(audit):
        drive(runtime, rounds)
    assert audit.h2d == []
    assert audit.syncs == []
    assert audit.reads == rounds                   # the decision, once a round
    # The slot events (3) and, for goodput, the timed rounds' cost samples: staged.
    timed = rounds - 1 - len(set(runtime.batch_steps_histogram)) if \
        runtime.policy.needs_round_cost else 0
    assert audit.staged >= 3 + max(timed, 0)


def test_the_audit_sees_what_it_must():
    x = meta(5)
    cases = {
        "h2d": [lambda: x.index_fill_(0, torch.tensor([1]), 0.0), lambda: x[torch.tensor([1, 2])],
                lambda: torch.tensor([1.0, 2.0], device="meta"),
                lambda: torch.as_tensor([1, 2], device="meta"),
                lambda: torch.ones(2).to("meta"), lambda: x.new_tensor([1.0])],
        "syncs": [lambda: x.sum().item(), lambda: int(x.argmax()), lambda: x.nonzero(),
                  lambda: x[x > 0], lambda: x.to("cpu"),
                  lambda: torch.empty(5).copy_(x, non_blocking=True)],
    }
    for kind, calls in cases.items():
        for call in calls:
            audit = DeviceAudit()
            with audit, FactoryAudit(audit):
                try:
                    call()
                except RuntimeError:  # a device mix the op refuses: seen before it ran
                    pass
            assert getattr(audit, kind), f"the audit missed a {kind} case"
    audit = DeviceAudit()
    with audit, FactoryAudit(audit):
        HostToDevice("meta")([1, 2, 3], torch.int64)
    assert audit.h2d == [] and audit.staged == 1
