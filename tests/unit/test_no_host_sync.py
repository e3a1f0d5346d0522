"""The per-round path (KL, steps_for, update, reset_slots) never synchronises with the host.

Checked on the CPU two ways: every aten op the path dispatches is audited (a value read
back to Python - ``.item()``, ``int()``, ``bool()``, a 0-dim tensor used as an index - shows
up as ``_local_scalar_dense``; data-dependent shapes as ``nonzero`` / ``masked_select`` /
boolean-mask indexing), and the core's source is scanned for the calls that bypass the
dispatcher (``.tolist()``, ``.cpu()``, ``.numpy()``). On a GPU the same path also passes
``torch.cuda.set_sync_debug_mode("error")`` (bench/micro_policy.py checks it there).
"""

import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_dsde.config import POLICY_CHOICES, DSDEConfig
from sglang_dsde.core import kl_per_position, make_policy
from sglang_dsde.core.round_cost import round_sample

CORE = Path(__file__).resolve().parents[2] / "sglang_dsde" / "core"
SYNCING_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select",
               "aten.repeat_interleave.Tensor", "aten.unique", "aten.item")


class SyncAudit(TorchDispatchMode):
    """Records every dispatched op that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCING_OPS):
            self.syncs.append(name)
        if name.startswith(("aten.index", "aten._index_put")) and len(args) > 1:
            indices = args[1] if isinstance(args[1], (list, tuple)) else []
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.syncs.append(name + " (boolean mask)")
        return func(*args, **(kwargs or {}))


def test_audit_catches_the_usual_syncs():
    x = torch.rand(6)
    for sync in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x[x > 0.5],
                 lambda: x[x.argmax()], lambda: torch.masked_select(x, x > 0.5),
                 lambda: x.nonzero()):
        with SyncAudit() as audit:
            sync()
        assert audit.syncs, "the audit missed a sync"


@pytest.mark.parametrize("policy", POLICY_CHOICES)
def test_round_path_has_no_host_sync(policy):
    pol = make_policy(DSDEConfig(policy=policy, window=4), max_slots=16,
                      default_initial_steps=4)
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 10, 300, generator=gen)
    draft = torch.randn(3, 10, 300, generator=gen)
    with SyncAudit() as audit:
        for _ in range(3):  # through warm-up, the bounds and predictions
            slots = torch.tensor([7, 2, 11])
            drafted = torch.tensor([10, 4, 0])
            temps = torch.tensor([0.0, 0.8, 1.0])
            pol.steps_for(slots)
            pol.observe_first_entropy(slots, torch.tensor([0.3, float("nan"), 2.0]))
            pol.batch_steps_for(slots)
            kl, entropy = kl_per_position(target, draft, drafted, temps, chunk_cols=128,
                                          with_draft_entropy=True)
            decision = pol.update(slots, drafted, torch.tensor([3, 4, 0]), req_kl=kl,
                                  req_temperature=temps, req_draft_entropy=entropy)
            pol.observe_round(round_sample(3, 10, 0.05))
        pol.reset_slots(torch.tensor([2]))
    assert audit.syncs == []
    assert decision.req_steps.shape == (3,) and decision.batch_steps.dim() == 0


def test_core_source_has_no_dispatcher_bypassing_syncs():
    offenders = []
    for path in CORE.rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\.(tolist|cpu|numpy|item)\(|\bnonzero\b|masked_select", code):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert offenders == []
