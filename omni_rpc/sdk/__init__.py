"""The Python SDK: ``DistributedOrchestrator``, ``LoadBalancer`` and ``HealthMonitor``.

The API of vLLM-Omni's distributed orchestration page, over the coordinator's gRPC services.
"""

from __future__ import annotations

from omni_rpc.sdk.monitor import HealthMonitor, LoadBalancer
from omni_rpc.sdk.orchestrator import DistributedOrchestrator, build_request
from omni_rpc.sdk.results import GenerationDelta, GenerationError, GenerationResult, Prompt

__all__ = [
    "DistributedOrchestrator",
    "GenerationDelta",
    "GenerationError",
    "GenerationResult",
    "HealthMonitor",
    "LoadBalancer",
    "Prompt",
    "build_request",
]
