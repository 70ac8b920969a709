"""omni-rpc: distributed inference orchestration for vLLM over gRPC.

The SDK entry points are importable from here::

    from omni_rpc import DistributedOrchestrator
"""

from __future__ import annotations

__version__ = "0.1.0"

from omni_rpc.sdk import (
    DistributedOrchestrator,
    GenerationDelta,
    GenerationError,
    GenerationResult,
    HealthMonitor,
    LoadBalancer,
)

__all__ = [
    "DistributedOrchestrator",
    "GenerationDelta",
    "GenerationError",
    "GenerationResult",
    "HealthMonitor",
    "LoadBalancer",
    "__version__",
]
