"""argparse types shared by every command line: a bad value exits 2 with a message naming it."""

from __future__ import annotations

import argparse

from omni_rpc import targets


def _checked(value: float, ok: bool, rule: str, text: str) -> None:
    if not ok:  # NaN fails every comparison, so it lands here too
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")


def positive_int(text: str) -> int:
    value = int(text)
    _checked(value, value >= 1, ">= 1", text)
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    _checked(value, value >= 0, ">= 0", text)
    return value


def positive_float(text: str) -> float:
    value = float(text)
    _checked(value, value > 0, "> 0", text)
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    _checked(value, value >= 0, ">= 0", text)
    return value


def host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def coordinators(text: str) -> str:
    """One coordinator HOST:PORT, several (``a:1,b:2``) or ``dns:///NAME:PORT``, as one line."""
    try:
        return targets.describe_checked(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
