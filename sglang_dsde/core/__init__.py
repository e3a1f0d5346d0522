"""DSDE's signal and policy core: pure torch (no SGLang import), batched, on any device.

Public interface (what the SGLang worker, the simulator and the replay call):

* ``kl_per_position(target_logits, draft_logits, num_drafted, temperature)`` -> ``[bs, P]``
  KL(p_target || q_draft) per drafted position, chunked over the vocabulary (``kl``).
* ``make_policy(cfg, max_slots=..., device=..., default_initial_steps=...)`` -> a
  ``SpecPolicy`` with ``steps_for(slots)``, ``update(slots, ...) -> PolicyDecision`` and
  ``reset_slots(slots)`` (``policies.base`` states the contract);
* ``PolicyDriver``: the one call sequence that steps a policy through rounds (``driver``),
  used by the engine runtime, the simulator and the replay.
"""

from .driver import PolicyDriver
from .kl import entropy_of_logits, kl_per_position
from .policies import POLICIES, PolicyDecision, SpecPolicy, make_policy

__all__ = ["POLICIES", "PolicyDecision", "PolicyDriver", "SpecPolicy", "entropy_of_logits",
           "kl_per_position", "make_policy"]
