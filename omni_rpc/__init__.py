"""omni-rpc: distributed inference orchestration for vLLM over gRPC.

This package is the shared runtime (configuration, settings, logging, metrics, security,
servers, backoff, validation and the generated ``omni_rpc.v1`` code) plus three layers on top:
``omni_rpc.sdk`` (the Python client API), ``omni_rpc.launchers`` (local processes, Ray actors,
GPU assignment) and ``omni_rpc.cli`` (the ``omni`` command). The SDK's names are importable from
here, loaded on first use, so that importing the runtime (as the coordinator and the agent do)
never loads the SDK::

    from omni_rpc import DistributedOrchestrator
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from omni_rpc.sdk import (
        CoordinatorUnreachableError,
        DistributedOrchestrator,
        GenerationDelta,
        GenerationError,
        GenerationResult,
        HealthMonitor,
        LoadBalancer,
        Media,
    )


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        return getattr(importlib.import_module("omni_rpc.sdk"), name)
    raise AttributeError(f"module 'omni_rpc' has no attribute {name!r}")


__all__ = [
    "CoordinatorUnreachableError",
    "DistributedOrchestrator",
    "GenerationDelta",
    "GenerationError",
    "GenerationResult",
    "HealthMonitor",
    "LoadBalancer",
    "Media",
    "__version__",
]
