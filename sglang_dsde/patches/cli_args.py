"""Touch-point: SGLang's argument parser, so DSDE's knobs appear in ``--help``.

Read against SGLang 0.5.23 (``srt/server_args.py``: ``ServerArgs.add_cli_args`` builds
the parser, ``ServerArgs.from_cli_args`` turns the namespace into the record; both run
after ``load_plugins()`` in ``launch_server`` and ``sglang serve``;
``srt/arg_groups/speculative_hook.py``: ``handle_speculative_decoding`` resolves the
algorithm and reads the draft's config first, so a BEFORE hook checks the draft path
there, ``sglang_dsde.pair_check``).

``ServerArgs`` is a closed record, so a plugin cannot add fields. The hooks add one
``--dsde-<knob>`` flag per ``DSDEConfig`` field (group "DSDE speculative decoding") and
fold the flags a user gave into ``speculative_adaptive_config`` as an inline JSON object,
on top of a config file given there. That field travels to every scheduler process;
``sglang_dsde.args`` validates it during argument resolution. ``sglang.Engine(...)``
users pass ``speculative_adaptive_config`` (a path or inline JSON) directly.

A refused value must reach the user as one line. ``DSDEConfigError`` is raised inside
SGLang's argument pipeline (``prepare_server_args`` / ``ServerArgs.resolve_once``, both at
the top level of ``launch_server``'s ``__main__`` and of ``sglang serve``), where nothing
catches it, so Python would print the whole stack. In the launcher process only (its
``__main__`` is ``sglang.launch_server`` or the ``sglang`` command), ``apply()`` chains a
``sys.excepthook`` that prints an uncaught ``DSDEConfigError`` as
``sglang-dsde: error: <message>``; every other exception, and every other program
(``sglang.Engine`` users get the exception object), is untouched.
"""

from __future__ import annotations

from sglang_dsde.patches import register_once

import argparse
import json
import os
import sys

from sglang_dsde import ALGORITHM_NAME
from sglang_dsde.config import (
    POLICY_CHOICES,
    DSDEConfigError,
    knob_flag,
    knob_help,
    knob_names,
    knob_type,
    load_json_source,
)

SGLANG_VERSION_READ = "0.5.23"
HOOKED_SYMBOLS = (
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.ServerArgs.from_cli_args",
    # Its first step reads the draft's config (algorithm aliases): check the path first.
    "sglang.srt.arg_groups.speculative_hook.handle_speculative_decoding",
)
_DEST_PREFIX = "dsde_"



def apply() -> None:
    """Register the parser hooks (once per process)."""
    if register_once(__name__, [(HOOKED_SYMBOLS[0], _add_dsde_flags, "AFTER"),
                                (HOOKED_SYMBOLS[1], _fold_dsde_flags, "AROUND"),
                                (HOOKED_SYMBOLS[2], _check_draft_path_first, "BEFORE")]):
        if _is_launcher_process():
            sys.excepthook = _one_line_config_errors(sys.excepthook)


def _check_draft_path_first(server_args, *args, **kwargs) -> None:
    """BEFORE SGLang's speculative resolution: a DSDE draft path that names no folder is
    refused naming the flag (SGLang would ask the model hub, whose error names none)."""
    if (getattr(server_args, "speculative_algorithm", None) or "").upper() == ALGORITHM_NAME:
        from sglang_dsde.pair_check import check_draft_path

        check_draft_path(getattr(server_args, "speculative_draft_model_path", None))


def _is_launcher_process() -> bool:
    """``python -m sglang.launch_server`` or the ``sglang`` command (``sglang serve``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) == "sglang.launch_server":
        return True
    return os.path.basename(sys.argv[0] if sys.argv else "") == "sglang"


def _one_line_config_errors(previous):
    def excepthook(kind, value, traceback):
        if isinstance(value, DSDEConfigError):
            print(f"sglang-dsde: error: {value}", file=sys.stderr, flush=True)
            return
        previous(kind, value, traceback)

    excepthook.sglang_dsde = True
    return excepthook


def _add_dsde_flags(_result, parser: argparse.ArgumentParser) -> None:
    """AFTER ``add_cli_args(parser)``: one flag per knob, absent from the namespace unless given."""
    group = parser.add_argument_group(
        "DSDE speculative decoding (sglang-dsde plugin)",
        "Used with --speculative-algorithm DSDE. The same knobs can be given as a JSON "
        "object (file path or inline) in --speculative-adaptive-config; flags win.")
    for name in knob_names():
        kind = knob_type(name)
        common = dict(dest=_DEST_PREFIX + name, default=argparse.SUPPRESS, help=knob_help(name))
        if kind is bool:
            group.add_argument(knob_flag(name), action=argparse.BooleanOptionalAction, **common)
        elif name == "policy":
            group.add_argument(knob_flag(name), choices=POLICY_CHOICES, **common)
        elif kind is tuple:  # a list of integers: --dsde-state-steps 0 1 2 4 8
            group.add_argument(knob_flag(name), type=int, nargs="+", metavar="INT", **common)
        else:
            group.add_argument(knob_flag(name), type=kind, metavar=kind.__name__.upper(),
                               **common)


def _fold_dsde_flags(original, cls, namespace: argparse.Namespace):
    """AROUND ``from_cli_args``: move given ``--dsde-*`` values into the config field."""
    given = {name: getattr(namespace, _DEST_PREFIX + name) for name in knob_names()
             if hasattr(namespace, _DEST_PREFIX + name)}
    for name in given:
        delattr(namespace, _DEST_PREFIX + name)
    if given:
        algorithm = getattr(namespace, "speculative_algorithm", None)
        if (algorithm or "").upper() != ALGORITHM_NAME:
            raise DSDEConfigError(
                f"{', '.join(knob_flag(n) for n in given)}: DSDE knobs need "
                f"--speculative-algorithm {ALGORITHM_NAME} (got {algorithm!r})")
        source = getattr(namespace, "speculative_adaptive_config", None)
        base = load_json_source(source)[0] if source and source.strip() else {}
        if not isinstance(base, dict):
            raise DSDEConfigError(f"DSDE config (--speculative-adaptive-config {source}): "
                                  f"expected a JSON object, got {type(base).__name__}")
        namespace.speculative_adaptive_config = json.dumps({**base, **given}, sort_keys=True)
    return original(cls, namespace)
