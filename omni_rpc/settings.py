"""Configuration from flags, environment and a TOML file, in that order of precedence.

Every option of a server's command line can also be given as ``OMNI_<NAME>`` (the flag's name,
upper case, dashes as underscores: ``--health-check-interval`` is
``OMNI_HEALTH_CHECK_INTERVAL``) or as a key of the component's table in the ``--config`` file::

    [coordinator]
    strategy = "least_loaded"
    health-check-interval = 2.0

Precedence: flag > environment > file > default. Unknown keys in the file and values that do not
parse fail at start-up (exit 2) with a message naming them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ENV_PREFIX = "OMNI_"


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    skip = {"help", "config", "print_config"}
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in skip}


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str) -> Any:
    """``raw`` (a string from the environment, or a TOML value) as the action would store it."""
    if action.nargs == 0:  # store_true / store_false
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        parser.error(f"{where}: expected true or false, got {raw!r}")
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [raw]
        return [_convert_one(parser, action, item, where) for item in items]
    return _convert_one(parser, action, raw, where)


def _convert_one(
    parser: argparse.ArgumentParser, action: argparse.Action, raw: Any, where: str
) -> Any:
    convert = action.type if callable(action.type) else str
    try:
        value = convert(str(raw))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        parser.error(f"{where}: {exc or 'invalid value'} (got {raw!r})")
    if action.choices is not None and value not in action.choices:
        known = ", ".join(map(str, action.choices))
        parser.error(f"{where}: {value!r} is not one of {known}")
    return value


def parse(
    parser: argparse.ArgumentParser,
    component: str,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse ``argv`` with the environment and the ``--config`` file as defaults.

    Returns the options and, for each, where its value came from.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    parser.add_argument("--config", help=f"TOML file; options go in its [{component}] table")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    options = _options(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config or env.get(env_name("config"))
    sources = {dest: "default" for dest in options}
    values: dict[str, Any] = {}
    if config_path:
        try:
            document = tomllib.loads(Path(config_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"--config {config_path}: {exc}")
        table = document.get(component, {})
        if not isinstance(table, dict):
            parser.error(f"{config_path}: [{component}] must be a table")
        for key, raw in table.items():
            dest = key.replace("-", "_")
            if dest not in options:
                known = ", ".join(sorted(d.replace("_", "-") for d in options))
                parser.error(
                    f"{config_path}: unknown key {key!r} in [{component}] (known: {known})"
                )
            values[dest] = _convert(parser, options[dest], raw, f"{key} in {config_path}")
            sources[dest] = f"file {config_path}"
    for dest, action in options.items():
        name = env_name(dest)
        if name in env:
            values[dest] = _convert(parser, action, env[name], name)
            sources[dest] = f"env {name}"
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    given = _given_flags(parser, argv)
    for dest in given:
        sources[dest] = "flag"
    return args, sources


def _given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    by_flag = {flag: a.dest for a in parser._actions for flag in a.option_strings}
    given = set()
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in by_flag:
            given.add(by_flag[flag])
    return given


def print_config(args: argparse.Namespace, sources: Mapping[str, str]) -> None:
    """The effective configuration, one JSON object: value and source of every option."""
    effective = {
        dest.replace("_", "-"): {"value": getattr(args, dest), "source": sources[dest]}
        for dest in sorted(sources)
    }
    print(json.dumps(effective, indent=2, default=str))
