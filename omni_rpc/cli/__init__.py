"""The ``omni`` command line: the top layer, free to use the SDK, the launchers and the servers."""

from __future__ import annotations

from omni_rpc.cli.main import main

__all__ = ["main"]
