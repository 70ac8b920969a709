"""``python -m omni_rpc``: the ``omni`` command line."""

from __future__ import annotations

import sys

from omni_rpc.cli import main

sys.exit(main())
