"""DSDE's knobs: one frozen dataclass, each default defined once, validated on construction.

This module is pure (standard library only): the policy core, the replay tool, the
simulator and the SGLang plugin all build the same ``DSDEConfig``. The plugin fills it
from ``--dsde-*`` flags or from ``--speculative-adaptive-config`` (a JSON file path or an
inline JSON object) and validates it at argument resolution, before any model is loaded.

Every validation error is one line naming the knob, its flag, the value and the allowed
range, e.g. ``--dsde-window (DSDE knob "window") = 0: expected an integer in [1, 1024]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

#: Policies the core implements (``sglang_dsde.core.policies``); "dsde" is the paper's.
POLICY_CHOICES = ("dsde", "static", "sglang_adaptive", "adaedl", "goodput")

#: Largest speculation length any runtime state may use (one pre-built state per value).
MAX_STEPS_LIMIT = 32
#: Largest KL history per request (the ring buffer is slots x window floats on device).
MAX_WINDOW = 1024
#: Step values that get a pre-built runtime state by default (those within
#: ``[min_steps, max_steps]``, plus both ends): dense where a step is a large share of the
#: verify width, then about x1.6 apart (``0 1 2 3 4 6 10`` for the default range).
STATE_LADDER = (0, 1, 2, 3, 4, 6, 10, 16, 24, 32)


#: SL of a new request when neither the ``initial_steps`` knob nor a static length
#: (``--speculative-num-steps``) says otherwise (clamped into the policy's range).
DEFAULT_INITIAL_STEPS = 4

#: ``min_steps`` when not given: the paper's floor of 2 for the policies that follow it.
_POLICY_MIN_STEPS = {"dsde": 2, "adaedl": 2}


def default_min_steps(policy: str) -> int:
    """The ``min_steps`` a config of ``policy`` gets when the knob is not set."""
    return _POLICY_MIN_STEPS.get(policy, 0)


def default_state_steps(min_steps: int, max_steps: int) -> tuple:
    """The ``state_steps`` a config gets when the knob is not set (``STATE_LADDER``)."""
    inside = {s for s in STATE_LADDER if min_steps <= s <= max_steps}
    return tuple(sorted(inside | {min_steps, max_steps}))


def state_steps_for(cfg: "DSDEConfig", initial_steps: int) -> tuple:
    """The step counts the engine can run: ``cfg.state_steps`` plus a new request's SL
    (SGLang builds that state at start-up anyway). Sorted; every decision is one of them."""
    return tuple(sorted(set(cfg.state_steps) | {int(initial_steps)}))


def initial_steps_for(cfg: "DSDEConfig", static_steps: Optional[int] = None) -> int:
    """The SL a new request starts at: the ``initial_steps`` knob when set, else the static
    length (``--speculative-num-steps``) when given, else ``DEFAULT_INITIAL_STEPS``
    clamped into ``[min_steps, max_steps]``. The one definition (engine, simulator, replay)."""
    if cfg.initial_steps is not None:
        return int(cfg.initial_steps)
    if static_steps is not None:
        return int(static_steps)
    return min(max(DEFAULT_INITIAL_STEPS, cfg.min_steps), cfg.max_steps)


class DSDEConfigError(ValueError):
    """A knob value outside its allowed range, an unknown knob, or malformed JSON."""


def _knob(default: Any, help: str, *, lo: Any = None, hi: Any = None,
          lo_open: bool = False, choices: tuple = (), kind: Optional[type] = None) -> Any:
    """A dataclass field whose metadata carries the CLI help and the allowed range
    (``kind``: the value's type when the default does not say, e.g. ``tuple`` of ints)."""
    return field(default=default, metadata=dict(help=help, lo=lo, hi=hi, lo_open=lo_open,
                                                choices=choices, kind=kind))


@dataclass(frozen=True)
class DSDEConfig:
    """Every DSDE knob with its default. Construction validates; instances are immutable."""

    policy: str = _knob("goodput", "Speculation-length policy: goodput (cost-aware: the step "
                        "count with the most expected tokens per second, docs/goodput.md), "
                        "dsde (the paper's KL-stability rule) or a baseline on the same "
                        "engine.", choices=POLICY_CHOICES)
    window: int = _knob(30, "KL history per request, in drafted tokens (W); also the "
                        "warm-up length.", lo=1, hi=MAX_WINDOW)
    decay: float = _knob(0.9, "Weight decay per token of age in the weighted variances "
                         "(newest weight 1).", lo=0.0, hi=1.0, lo_open=True)
    alpha: float = _knob(2.0, "Scale-factor sharpness: SF = exp(alpha * mean_kl) - 1.",
                         lo=0.0, hi=100.0, lo_open=True)
    min_steps: Optional[int] = _knob(None, "Smallest speculation length a request may get "
                                     "(SL_min); default: 2 for dsde and adaedl (the "
                                     "paper's floor), 0 for the others (0: the free off, "
                                     "a target-only round).", lo=0, hi="max_steps")
    max_steps: int = _knob(10, "Largest speculation length (SL_max); sizes the verify "
                           "buffers and the pre-built runtime states.", lo=1,
                           hi=MAX_STEPS_LIMIT)
    batch_cap: bool = _knob(True, "Cap post-warm-up requests at ceil(mean of their "
                            "predicted SLs) so one request does not stall the batch.")
    kmax_kl_weight: float = _knob(0.5, "Weight of mean_kl/max_kl in the per-request upper "
                                  "bound round(max_accepted * (1 + w * mean/max)).",
                                  lo=0.0, hi=10.0)
    kmin_fraction: float = _knob(0.1, "Per-request lower bound as a fraction of its upper "
                                 "bound: ceil(f * k_max).", lo=0.0, hi=1.0)
    initial_steps: Optional[int] = _knob(None, "SL of a new request; default: "
                                         "--speculative-num-steps.", lo="min_steps",
                                         hi="max_steps")
    state_steps: Optional[tuple] = _knob(None, "Step counts that get a pre-built runtime "
                                         "state (CUDA graphs, attention backends), plus "
                                         "--speculative-num-steps; every decision is one of "
                                         "them (a per-request policy's batch runs the "
                                         "largest not above its decision). Default: 0 1 2 "
                                         "3 4 6 10 16 24 32 within [min_steps, max_steps], "
                                         "plus both ends (0 1 2 3 4 6 10 for the defaults).",
                                         lo="min_steps", hi="max_steps", kind=tuple)
    per_request_cut: bool = _knob(False, "Cut a request's verify chain at its own SL when "
                                  "the batch drafts more (lossless, saves no compute).")
    ragged_verify: bool = _knob(True, "Ragged verify: the batch drafts its largest SL and "
                                "each request verifies only its own SL + 1 tokens, where "
                                "the engine supports it (else, with one log line, every "
                                "request verifies the batch's full window).")
    # Knobs of the AdaEDL-style baseline (policy "adaedl"); ignored by the other policies.
    adaedl_gamma: float = _knob(0.5, "adaedl policy: gamma of the acceptance lower bound "
                                "1 - sqrt(gamma * draft_entropy).", lo=0.0, hi=100.0,
                                lo_open=True)
    adaedl_lambda: float = _knob(0.5, "adaedl policy: stop drafting where the bound falls "
                                 "below this threshold.", lo=0.0, hi=1.0)
    adaedl_ema: float = _knob(0.2, "adaedl policy: EMA weight of the per-request threshold "
                              "calibration (observed acceptance - bound).", lo=0.0, hi=1.0)

    # Knobs of the cost-aware policy (policy "goodput"); ignored by the other policies.
    goodput_kl_weight: float = _knob(0.5, "goodput policy: weight of the KL-calibrated "
                                     "acceptance estimate against the observed acceptance "
                                     "rate.", lo=0.0, hi=1.0)
    goodput_stability_weight: float = _knob(0.5, "goodput policy: confidence discount "
                                            "p ** (1 + w * max(0, WVIR - 1)).", lo=0.0,
                                            hi=10.0)
    goodput_probe_every: int = _knob(32, "goodput policy: every this many rounds the batch "
                                     "drafts the next runtime state above its estimate, or "
                                     "alternately the one below (exploration; 0: never).",
                                     lo=0, hi=100000)

    def __post_init__(self) -> None:
        if self.min_steps is None and self.policy in POLICY_CHOICES:
            # Resolved once, here: every reader sees an int.
            object.__setattr__(self, "min_steps", default_min_steps(self.policy))
            # Not a field: error messages say which bound the user never set.
            object.__setattr__(self, "_min_steps_defaulted", True)
            _refuse_max_below_default_min(self)
        for f in dataclasses.fields(self):
            _check_value(self, f, getattr(self, f.name))
        # Resolved once, here, after the range checks: every reader sees a sorted tuple.
        steps = self.state_steps
        object.__setattr__(self, "state_steps",
                           default_state_steps(self.min_steps, self.max_steps)
                           if steps is None else tuple(sorted(steps)))
        if self.per_request_cut and self.policy == "goodput":
            raise DSDEConfigError(
                f"{knob_flag('per_request_cut')} (DSDE knob 'per_request_cut') = true: not "
                f"with --dsde-policy goodput, which drafts one step count for the whole "
                f"batch (a cut could only lose tokens the round already paid for)")

    def replace(self, **changes: Any) -> "DSDEConfig":
        """A validated copy with ``changes`` applied (a derived ``state_steps`` is derived
        again from the new range)."""
        if "state_steps" not in changes and self.state_steps == default_state_steps(
                self.min_steps, self.max_steps):
            changes["state_steps"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "") -> "DSDEConfig":
        """Build from a JSON-like mapping; unknown keys are refused (one line each)."""
        if not isinstance(values, Mapping):
            raise DSDEConfigError(f"DSDE config{_where(source)}: expected a JSON object, "
                                  f"got {type(values).__name__}")
        names = knob_names()
        for key in values:
            if key not in names:
                raise DSDEConfigError(
                    f"DSDE config{_where(source)}: unknown knob {key!r}; known knobs: "
                    f"{', '.join(names)}")
        return cls(**dict(values))

    @classmethod
    def from_json_source(cls, text_or_path: Optional[str]) -> "DSDEConfig":
        """Parse ``--speculative-adaptive-config``: an inline JSON object or a file path."""
        if text_or_path is None or not str(text_or_path).strip():
            return cls()
        values, source = load_json_source(str(text_or_path))
        return cls.from_mapping(values, source=source)


def _refuse_max_below_default_min(cfg: DSDEConfig) -> None:
    """A policy's default floor above the ``max_steps`` the user set: blame ``max_steps``
    (the knob the user set), not the ``min_steps`` default the user never passed."""
    hi = cfg.max_steps
    _check_value(cfg, _field("max_steps"), hi)  # a malformed max_steps first
    if cfg.min_steps > hi:
        raise DSDEConfigError(
            f"{knob_flag('max_steps')} (DSDE knob 'max_steps') = {hi}: expected an integer "
            f"in [{cfg.min_steps}, {MAX_STEPS_LIMIT}] with --dsde-policy {cfg.policy}, whose "
            f"smallest speculation length is {cfg.min_steps} (the default of "
            f"{knob_flag('min_steps')}; set it to go lower)")


def knob_names() -> tuple:
    return tuple(f.name for f in dataclasses.fields(DSDEConfig))


def knob_flag(name: str) -> str:
    """The launch flag of a knob, e.g. ``window`` -> ``--dsde-window``."""
    return "--dsde-" + name.replace("_", "-")


def knob_help(name: str) -> str:
    """Help text with the default and the allowed range, for ``--help`` and the README."""
    f = _field(name)
    meta = f.metadata
    return f"{meta['help']} Default: {_fmt(f.default)}; allowed: {_range_text(None, f)}."


def knob_type(name: str) -> type:
    """The Python type a knob's value has (``int``, ``float``, ``bool``, ``str``, or
    ``tuple``: a list of integers).

    Read from the default; a knob whose default is None is an int unless it says otherwise.
    """
    f = _field(name)
    if f.metadata["kind"] is not None:
        return f.metadata["kind"]
    return int if f.default is None else type(f.default)


def parse_knob_text(name: str, text: str) -> Any:
    """A knob's value from command-line text (a list knob: integers split on commas or
    spaces); the config validates it."""
    kind = knob_type(name)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise DSDEConfigError(f"{knob_flag(name)} = {text!r}: expected true or false")
    try:
        if kind is tuple:
            return tuple(int(v) for v in text.replace(",", " ").split())
        return kind(text)
    except ValueError:
        raise DSDEConfigError(f"{knob_flag(name)} = {text!r}: expected "
                              f"{_range_text(None, _field(name))}") from None


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(DSDEConfig) if f.name == name)


def _where(source: str) -> str:
    return f" ({source})" if source else ""


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


def _bound(cfg: Optional[DSDEConfig], bound: Any) -> Any:
    """A numeric bound, or the current value of the knob a bound names (``"max_steps"``)."""
    if isinstance(bound, str):
        return getattr(cfg, bound) if cfg is not None else bound
    return bound


def _range_text(cfg: Optional[DSDEConfig], f: dataclasses.Field) -> str:
    meta = f.metadata
    kind = knob_type(f.name)
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    if kind is bool:
        return "true or false"
    lo, hi = _bound(cfg, meta["lo"]), _bound(cfg, meta["hi"])
    lo_txt = f"{meta['lo']}={lo}" if isinstance(meta["lo"], str) and cfg else str(lo)
    hi_txt = f"{meta['hi']}={hi}" if isinstance(meta["hi"], str) and cfg else str(hi)
    noun = {int: "an integer", tuple: "distinct integers"}.get(kind, "a number")
    extra = " (or none)" if f.default is None else ""
    return f"{noun} in {'(' if meta['lo_open'] else '['}{lo_txt}, {hi_txt}]{extra}"


def _check_value(cfg: DSDEConfig, f: dataclasses.Field, value: Any) -> None:
    kind = knob_type(f.name)
    meta = f.metadata

    def refuse() -> None:
        hint = ""
        if meta["lo"] == "min_steps" and getattr(cfg, "_min_steps_defaulted", False):
            hint = (f" (min_steps is {cfg.min_steps}, the default of {knob_flag('min_steps')} "
                    f"for --dsde-policy {cfg.policy})")
        raise DSDEConfigError(f"{knob_flag(f.name)} (DSDE knob {f.name!r}) = {value!r}: "
                              f"expected {_range_text(cfg, f)}{hint}")

    if value is None:
        if f.default is not None:
            refuse()
        return
    if kind is bool:
        if not isinstance(value, bool):
            refuse()
        return
    if kind is str:
        if value not in meta["choices"]:
            refuse()
        return
    if kind is tuple:
        if not isinstance(value, (list, tuple)) or not value or \
                len(set(value)) != len(value):
            refuse()
        lo, hi = _bound(cfg, meta["lo"]), _bound(cfg, meta["hi"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
                   for v in value):
            refuse()
        return
    # Numbers: bool is an int subclass and never a valid number here.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        refuse()
    if kind is int and not isinstance(value, int):
        refuse()
    if isinstance(value, float) and not math.isfinite(value):
        refuse()
    lo, hi = _bound(cfg, meta["lo"]), _bound(cfg, meta["hi"])
    if lo is not None and (value < lo or (meta["lo_open"] and value == lo)):
        refuse()
    if hi is not None and value > hi:
        refuse()


def load_json_source(text_or_path: str) -> tuple:
    """Return ``(mapping, source)`` from inline JSON or a file; one-line errors."""
    text = text_or_path.strip()
    if text.startswith("{"):
        source, body = "inline --speculative-adaptive-config", text
    else:
        source = f"--speculative-adaptive-config {text_or_path}"
        if not os.path.isfile(text_or_path):
            raise DSDEConfigError(f"DSDE config ({source}): no such file")
        with open(text_or_path, encoding="utf-8") as fh:
            body = fh.read()
    try:
        values = json.loads(body)
    except json.JSONDecodeError as exc:
        raise DSDEConfigError(f"DSDE config ({source}): malformed JSON: {exc.msg} at line "
                              f"{exc.lineno} column {exc.colno}") from None
    return values, source


def knob_table_markdown() -> str:
    """The README's knobs table (``python -m sglang_dsde.config`` prints it)."""
    rows = ["| knob (JSON key) | flag | default | allowed | meaning |",
            "|---|---|---|---|---|"]
    for f in dataclasses.fields(DSDEConfig):
        rows.append(f"| `{f.name}` | `{knob_flag(f.name)}` | {_fmt(f.default)} | "
                    f"{_range_text(None, f)} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(knob_table_markdown())
