"""Policy registry: ``make_policy(cfg, ...)`` builds the policy ``cfg.policy`` names.

Every name in ``config.POLICY_CHOICES`` has exactly one class here (a test checks it).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...config import POLICY_CHOICES, DSDEConfig
from .adaedl import AdaEDLPolicy
from .base import PolicyDecision, SpecPolicy
from .baselines import SGLangAdaptivePolicy, StaticPolicy
from .dsde import DSDEPolicy
from .goodput import GoodputPolicy

POLICIES = {cls.name: cls for cls in (DSDEPolicy, StaticPolicy, SGLangAdaptivePolicy,
                                      AdaEDLPolicy, GoodputPolicy)}
assert tuple(sorted(POLICIES)) == tuple(sorted(POLICY_CHOICES)), "keep POLICY_CHOICES in sync"


def make_policy(cfg: DSDEConfig, *, max_slots: int, device="cpu",
                default_initial_steps: Optional[int] = None, **kwargs) -> SpecPolicy:
    """The policy ``cfg.policy``, with state for ``max_slots`` request slots on ``device``.

    A new request's SL is ``cfg.initial_steps`` when set, else ``default_initial_steps``
    (the engine passes ``--speculative-num-steps``); one of them is required. Extra
    keyword arguments go to the policy class (e.g. ``tiers`` for ``sglang_adaptive``).
    """
    initial = cfg.initial_steps if cfg.initial_steps is not None else default_initial_steps
    if initial is None:
        raise ValueError("make_policy: no initial SL: set DSDEConfig.initial_steps or pass "
                         "default_initial_steps")
    return POLICIES[cfg.policy](cfg, max_slots=max_slots, device=torch.device(device),
                                initial_steps=int(initial), **kwargs)


__all__ = ["POLICIES", "PolicyDecision", "SpecPolicy", "make_policy"]
