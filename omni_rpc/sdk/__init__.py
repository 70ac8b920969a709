"""The Python SDK: ``DistributedOrchestrator``, ``LoadBalancer`` and ``HealthMonitor``.

Generation with load balancing and failover over the coordinator's gRPC services, and views of
the cluster's load and health (see the README for the whole API).
"""

from __future__ import annotations

from omni_rpc.sdk.chat import Media
from omni_rpc.sdk.monitor import HealthMonitor, LoadBalancer
from omni_rpc.sdk.orchestrator import DistributedOrchestrator, build_chat_request, build_request
from omni_rpc.sdk.results import (
    CoordinatorUnreachableError,
    GenerationDelta,
    GenerationError,
    GenerationResult,
    MediaOutput,
    Prompt,
)

__all__ = [
    "CoordinatorUnreachableError",
    "DistributedOrchestrator",
    "GenerationDelta",
    "GenerationError",
    "GenerationResult",
    "HealthMonitor",
    "LoadBalancer",
    "Media",
    "MediaOutput",
    "Prompt",
    "build_chat_request",
    "build_request",
]
