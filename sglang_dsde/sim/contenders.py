"""Contenders: the one list of what a simulation or an engine bench compares, by name.

Spec strings (CLI ``--contenders``, comma-separated lists become ``;``-separated when
knobs are given)::

    static:K                  every request drafts K (K = 0: no speculation)
    dsde                      the paper's policy with its defaults (min_steps 2), each
                              request verifying its own SL (a ragged verify)
    dsde-padded               the same, every request verifying the batch's full window
    dsde+cut                  padded, each request's accept cut at its own SL
    sglang_adaptive           SGLang's in-tree rule (min_steps 0: its tiers unclamped)
    adaedl, adaedl-padded     the draft-entropy baseline, ragged / padded
    goodput, goodput-padded   the cost-aware policy (it may stop drafting), choosing every
                              request's length / one length for the batch
    NAME:knob=value,...       any policy of the core registry with DSDEConfig knobs
    hindsight-greedy          the myopic hindsight schedule (needs the cost model)
    hindsight-ragged          the same with per-request lengths (each request verifies
                              exactly what it will accept)

Every policy contender gets ``max_steps`` = the trace's (unless a knob says less) and a
new request's SL = ``config.initial_steps_for`` unless the knobs set ``initial_steps``.
The label of a contender is its spec string. ``build_controller`` builds a fresh
controller per simulation; ``Contender.server_kwargs`` says how the engine runs it
(``static:0``: no speculation; ``static:k``: SGLang's STANDALONE with k steps; a policy:
``--speculative-algorithm DSDE`` with its knobs as ``--dsde-*`` flags).
``POLICY_CONTENDERS`` is the list the simulator and the engine bench both compare
(after ``static:0 .. static:K``; the simulator adds the ``HINDSIGHT`` schedules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

from ..config import DSDEConfig, initial_steps_for, knob_flag, knob_names, parse_knob_text
from ..core.policies import POLICIES
from .controllers import Controller, HindsightGreedyController, PolicyController
from .cost import RoundCost

#: The policy contenders every comparison runs, simulated and on the engine: each
#: per-request policy with a ragged and a padded verify.
POLICY_CONTENDERS = ("sglang_adaptive", "dsde", "dsde-padded", "dsde+cut", "goodput",
                     "goodput-padded", "adaedl", "adaedl-padded")
#: The hindsight schedules the simulator adds.
HINDSIGHT = {"hindsight-greedy": False, "hindsight-ragged": True}

_PADDED = {"ragged_verify": False}
#: Knob presets of the named contenders (applied before the spec's own knobs).
NAMED = {
    "dsde": ("dsde", {}),
    "dsde-padded": ("dsde", _PADDED),
    "dsde+cut": ("dsde", {"per_request_cut": True, **_PADDED}),
    "sglang_adaptive": ("sglang_adaptive", {"min_steps": 0}),
    "adaedl": ("adaedl", {}),
    "adaedl-padded": ("adaedl", _PADDED),
    "goodput": ("goodput", {}),
    "goodput-padded": ("goodput", _PADDED),
}


@dataclass(frozen=True)
class Contender:
    label: str
    kind: str                     # "policy" or "hindsight"
    policy: str = ""
    knobs: Dict[str, object] = field(default_factory=dict)

    @property
    def static_steps(self):
        """K for a static contender, else None."""
        if self.policy == "static":
            return self.knobs.get("initial_steps")
        return None

    @property
    def name(self) -> str:
        return self.label

    def server_kwargs(self, draft, *, max_steps: int) -> dict:
        """``tools.serving.running_server`` arguments that run this contender on the
        engine (module docstring); policies draft at most ``max_steps`` (a knob may say
        less) and start at that many."""
        if self.kind != "policy":
            raise ValueError(f"contender {self.label} cannot run on the engine")
        k = self.static_steps
        if k == 0:
            return {"algorithm": None, "draft_model_path": None, "extra_args": []}
        if k is not None:
            return {"algorithm": "STANDALONE", "draft_model_path": draft, "num_steps": k,
                    "extra_args": []}
        knobs = {"max_steps": max_steps, "policy": self.policy, **self.knobs}
        flags = []
        for key, value in knobs.items():
            if isinstance(value, bool):
                flags.append(knob_flag(key) if value else "--no-" + knob_flag(key)[2:])
            elif isinstance(value, tuple):
                flags += [knob_flag(key), *map(str, value)]
            else:
                flags += [knob_flag(key), str(value)]
        return {"algorithm": "DSDE", "draft_model_path": draft,
                "num_steps": knobs["max_steps"], "extra_args": flags}


def parse_contender(spec: str) -> Contender:
    """A ``Contender`` from one spec string (module docstring)."""
    spec = spec.strip()
    if spec in HINDSIGHT:
        return Contender(spec, "hindsight")
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
        knobs[key] = parse_knob_text(key, value.strip())
    return Contender(spec, "policy", policy, knobs)


def parse_contenders(text: str) -> List[Contender]:
    """``;``-separated specs (``,`` also separates when no spec has knobs)."""
    parts = text.split(";") if (";" in text or "=" in text) else text.split(",")
    return [parse_contender(p) for p in parts if p.strip()]


def static_contenders(steps) -> List[Contender]:
    """``static:k`` for each k of ``steps`` (an int K means 0 .. K)."""
    steps = range(steps + 1) if isinstance(steps, int) else steps
    return [parse_contender(f"static:{k}") for k in steps]


def comparison_contenders(static_steps, policies=POLICY_CONTENDERS) -> List[Contender]:
    """The one list: ``static:0`` (no speculation), ``static:k`` for each k of
    ``static_steps`` (an int K means 1 .. K), then the policy contenders."""
    steps = range(1, static_steps + 1) if isinstance(static_steps, int) else static_steps
    return static_contenders([0, *steps]) + [parse_contender(p) for p in policies]


def contender_config(c: Contender, max_steps: int) -> DSDEConfig:
    knobs = dict(c.knobs)
    knobs.setdefault("max_steps", max_steps)
    if knobs["max_steps"] > max_steps:
        raise ValueError(f"contender {c.label}: max_steps {knobs['max_steps']} exceeds the "
                         f"trace's {max_steps}")
    cfg = DSDEConfig(policy=c.policy, **knobs)
    return cfg if cfg.initial_steps is not None else cfg.replace(
        initial_steps=initial_steps_for(cfg))


def build_controller(c: Contender, *, max_steps: int, max_slots: int,
                     cost: RoundCost) -> Controller:
    """A fresh controller for one simulation run."""
    if c.kind == "hindsight":
        return HindsightGreedyController(cost, max_steps, ragged=HINDSIGHT[c.label])
    return PolicyController(contender_config(c, max_steps), max_slots=max_slots, name=c.label)
