"""The coordinator's parts built from its command line, once for every kind of process.

A single-process coordinator (``coordinator/main.py``) builds both halves; with ``--workers N``
the control process (``coordinator/control.py``) builds the registry half and each worker
(``coordinator/worker.py``) the data-plane half over its replica of the registry.
"""

from __future__ import annotations

import argparse

from coordinator.admission import Admission, Limits
from coordinator.balancer import Balancer
from coordinator.circuit import BreakerPolicy
from coordinator.dispatch import Dispatcher
from coordinator.health import HealthMonitor
from coordinator.node_client_grpc import GrpcConnector
from coordinator.outliers import LatencyOutliers
from coordinator.registry import Registry
from coordinator.stalls import StallPolicy
from coordinator.strategies import make_strategy
from omni_rpc import security
from omni_rpc.metrics import CoordinatorMetrics


def connector(args: argparse.Namespace, guard: security.ServerSecurity) -> GrpcConnector:
    """How this process dials the agents."""
    return GrpcConnector(guard.outgoing, max_buffered_tokens=args.max_buffered_tokens)


def monitored_registry(
    args: argparse.Namespace, guard: security.ServerSecurity, metrics: CoordinatorMetrics
) -> Registry:
    """The registry with its health monitor and breaker, counting probes and ejections."""
    registry = Registry(
        connector(args, guard),
        BreakerPolicy(args.breaker_failures, args.breaker_base_ejection, args.breaker_max_ejection),
        readmit_after=args.readmit_after,
        forget_after_s=args.forget_after,
        flap_hold_s=args.flap_hold,
        flap_max_hold_s=args.flap_max_hold,
    )
    HealthMonitor(
        registry,
        args.health_check_interval,
        args.health_check_timeout,
        observe_probe=metrics.health_probe_duration.observe,
    )
    registry.on_ejected.append(lambda node: metrics.ejections.labels(node.node_id).inc())
    return registry


def data_plane(
    args: argparse.Namespace, registry: Registry, metrics: CoordinatorMetrics
) -> tuple[Dispatcher, Admission]:
    """What serves Generate from ``registry``: the dispatcher and the admission limits."""
    dispatcher = Dispatcher(
        registry,
        Balancer(
            registry,
            make_strategy(
                args.strategy,
                balance_abs_threshold=args.cache_balance_abs_threshold,
                balance_rel_threshold=args.cache_balance_rel_threshold,
            ),
        ),
        args.max_retries,
        no_node_wait_s=args.no_node_wait,
        metrics=metrics,
        log_prompts=args.log_prompts,
        stream_interval=args.stream_interval,
        stall_policy=StallPolicy(timeout_s=args.stall_timeout),
        outliers=LatencyOutliers() if args.outlier_ejection else None,
    )
    admission = Admission(
        Limits(
            max_prompt_bytes=args.max_prompt_bytes,
            max_media_bytes=args.max_media_bytes,
            max_tokens_cap=args.max_tokens_cap,
            max_streams=args.max_streams,
            max_streams_per_client=args.max_streams_per_client,
            max_queue=args.max_queue,
        ),
        capacity=lambda: registry.capacity,
    )
    return dispatcher, admission
