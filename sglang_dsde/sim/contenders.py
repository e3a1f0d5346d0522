"""Contender specs: which SL controller a simulation (or a bench run) uses, by name.

Spec strings (CLI ``--contenders``, comma-separated lists become ``;``-separated when
knobs are given)::

    static:K                  every request drafts K (K = 0: no speculation)
    dsde                      the paper's policy with its defaults (min_steps 2)
    dsde+cut                  the same with the per-request cut on
    sglang_adaptive           SGLang's in-tree rule (min_steps 0: its tiers unclamped)
    adaedl                    the draft-entropy baseline
    goodput                   the cost-aware policy (min_steps 0: it may stop drafting)
    NAME:knob=value,...       any policy of the core registry with DSDEConfig knobs
    hindsight-greedy          the myopic hindsight schedule (needs the cost model)

Every policy contender gets ``max_steps`` = the trace's (unless a knob says less) and a
new request's SL = ``initial_steps`` (default 4, the replay's default, clamped into the
policy's range) unless the knobs set ``initial_steps``. The label of a contender is its
spec string. ``build_controller`` builds a fresh controller per simulation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from ..config import DSDEConfig, default_min_steps, knob_names, knob_type
from ..core.policies import POLICIES
from .controllers import Controller, HindsightGreedyController, PolicyController
from .cost import RoundCost

DEFAULT_INITIAL_STEPS = 4

#: Knob presets of the named contenders (applied before the spec's own knobs).
NAMED = {
    "dsde": ("dsde", {}),
    "dsde+cut": ("dsde", {"per_request_cut": True}),
    "sglang_adaptive": ("sglang_adaptive", {"min_steps": 0}),
    "adaedl": ("adaedl", {}),
    "goodput": ("goodput", {}),
}


@dataclass(frozen=True)
class Contender:
    label: str
    kind: str                     # "policy" or "hindsight-greedy"
    policy: str = ""
    knobs: Dict[str, object] = field(default_factory=dict)

    @property
    def static_steps(self):
        """K for a static contender, else None."""
        if self.policy == "static":
            return self.knobs.get("initial_steps")
        return None


def _parse_value(name: str, text: str):
    kind = knob_type(name)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"knob {name}: {text!r} is not a boolean")
    return kind(text)


def parse_contender(spec: str) -> Contender:
    """A ``Contender`` from one spec string (module docstring)."""
    spec = spec.strip()
    if spec == HindsightGreedyController.name:
        return Contender(spec, "hindsight-greedy")
    head, _, rest = spec.partition(":")
    if head == "static":
        return Contender(spec, "policy", "static",
                         {"min_steps": 0, "initial_steps": int(rest)})
    policy, knobs = NAMED.get(head, (head, {}))
    if policy not in POLICIES:
        raise ValueError(f"unknown contender {spec!r}: policies are {', '.join(POLICIES)}")
    knobs = dict(knobs)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in knob_names():
            raise ValueError(f"contender {spec!r}: {item!r} is not knob=value with a "
                             f"DSDEConfig knob")
        knobs[key] = _parse_value(key, value.strip())
    return Contender(spec, "policy", policy, knobs)


def parse_contenders(text: str) -> List[Contender]:
    """``;``-separated specs (``,`` also separates when no spec has knobs)."""
    parts = text.split(";") if (";" in text or "=" in text) else text.split(",")
    return [parse_contender(p) for p in parts if p.strip()]


def static_contenders(max_steps: int) -> List[Contender]:
    return [parse_contender(f"static:{k}") for k in range(max_steps + 1)]


def contender_config(c: Contender, max_steps: int) -> DSDEConfig:
    knobs = dict(c.knobs)
    knobs.setdefault("max_steps", max_steps)
    if knobs["max_steps"] > max_steps:
        raise ValueError(f"contender {c.label}: max_steps {knobs['max_steps']} exceeds the "
                         f"trace's {max_steps}")
    min_steps = knobs.get("min_steps", default_min_steps(c.policy))
    if "initial_steps" not in knobs:
        knobs["initial_steps"] = min(max(DEFAULT_INITIAL_STEPS, min_steps), knobs["max_steps"])
    return DSDEConfig(policy=c.policy, **knobs)


def build_controller(c: Contender, *, max_steps: int, max_slots: int,
                     cost: RoundCost) -> Controller:
    """A fresh controller for one simulation run."""
    if c.kind == "hindsight-greedy":
        return HindsightGreedyController(cost, max_steps)
    cfg = contender_config(c, max_steps)
    return PolicyController(cfg, max_slots=max_slots, initial_steps=cfg.initial_steps,
                            name=c.label)
