"""Prometheus metrics: one registry per process, served on ``--metrics-port``.

Names start with ``omni_`` and follow Prometheus conventions (base units, ``_total`` on
counters). Per-node and per-engine gauges are read from live state when scraped, so the
request path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from omni_rpc.logging import get_logger

log = get_logger("omni_rpc.metrics")

# Seconds: from a cache hit on a tiny model to a long generation on a big one.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "omni_requests",
            "Generate calls by final status (ok or a gRPC code).",
            ["status"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "omni_time_to_first_token_seconds",
            "From the call to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "omni_request_duration_seconds",
            "End-to-end duration of Generate calls.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "omni_generated_tokens", "Tokens delivered to clients.", registry=r
        )
        self.retries = Counter(
            "omni_retries", "Further attempts of a call after a failed one.", registry=r
        )
        self.failovers = Counter(
            "omni_failovers", "Attempts that left a node because the node failed.", registry=r
        )
        self.resumes = Counter(
            "omni_resumes",
            "Attempts that continued a stream another node had started.",
            registry=r,
        )
        self.ejections = Counter(
            "omni_ejections", "Circuit-breaker ejections.", ["node_id"], registry=r
        )
        self.health_probe_duration = Histogram(
            "omni_health_probe_duration_seconds",
            "Active health checks (Check + GetLoad).",
            buckets=PROBE_BUCKETS,
            registry=r,
        )

    def watch_nodes(self, nodes: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        """Export per-node gauges from ``nodes()``: (node_id, state, in_flight) tuples."""
        self.registry.register(_NodeCollector(nodes))

    def watch_cache(self, nodes: Callable[[], Iterable[CacheCounts]]) -> None:
        """Export the nodes' prefix-cache counters and the cluster hit rate from ``nodes()``."""
        self.registry.register(_CacheCollector(nodes))


NODE_STATES = ("joining", "healthy", "unhealthy", "draining", "left")


def cache_counts(nodes: Iterable[Any]) -> list[CacheCounts]:
    """``cache_families``' input from registry nodes (``node_id`` and the last ``load``)."""
    return [
        (n.node_id, n.load.prompt_tokens, n.load.cached_prompt_tokens)
        for n in list(nodes)
        if n.load is not None
    ]


def node_families(nodes: Iterable[tuple[str, str, int]]) -> list[Metric]:
    """The per-node gauges of (node_id, state, in_flight) tuples."""
    in_flight = GaugeMetricFamily(
        "omni_node_in_flight", "Requests the coordinator has on each node.", labels=["node_id"]
    )
    state = GaugeMetricFamily(
        "omni_node_state", "1 for the state each node is in.", labels=["node_id", "state"]
    )
    for node_id, current, count in list(nodes):
        in_flight.add_metric([node_id], count)
        for name in NODE_STATES:
            state.add_metric([node_id, name], 1.0 if name == current else 0.0)
    return [in_flight, state]


# (node_id, lifetime prompt tokens, of them found in the prefix cache), as the agents report.
CacheCounts = tuple[str, int, int]


def cache_families(nodes: Iterable[CacheCounts]) -> list[Metric]:
    """Each node's prompt tokens and cached prompt tokens (its agent's lifetime counters, all
    coordinators' requests together), and the cluster's prefix-cache hit rate: cached over
    prompt tokens, summed over the nodes known now."""
    prompt = CounterMetricFamily(
        "omni_node_prompt_tokens",
        "Prompt tokens of the requests each node's engine finished.",
        labels=["node_id"],
    )
    cached = CounterMetricFamily(
        "omni_node_cached_prompt_tokens",
        "Of those, the tokens found in the engine's prefix cache.",
        labels=["node_id"],
    )
    total_prompt = total_cached = 0
    for node_id, prompt_tokens, cached_tokens in list(nodes):
        prompt.add_metric([node_id], prompt_tokens)
        cached.add_metric([node_id], cached_tokens)
        total_prompt += prompt_tokens
        total_cached += cached_tokens
    rate = GaugeMetricFamily(
        "omni_prefix_cache_hit_rate",
        "Prompt tokens found in the engines' prefix caches over all prompt tokens, cluster-wide "
        "(the nodes' lifetime counters).",
        value=total_cached / total_prompt if total_prompt else 0.0,
    )
    return [prompt, cached, rate]


class _CacheCollector(Collector):
    def __init__(self, nodes: Callable[[], Iterable[CacheCounts]]) -> None:
        self.nodes = nodes

    def collect(self) -> Iterable[Metric]:
        yield from cache_families(self.nodes())


class _NodeCollector(Collector):
    def __init__(self, nodes: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.nodes = nodes

    def collect(self) -> Iterable[Metric]:
        yield from node_families(self.nodes())


def merge_exposition(texts: Iterable[str]) -> list[Metric]:
    """The metrics of several processes (Prometheus text format) as one process's: every
    sample's value summed over the texts by metric name and labels, families in the order
    first seen. Counters, histograms (buckets, count, sum) and gauges of counts add up;
    ``_created`` timestamps are dropped (a sum of them means nothing).

    A coordinator with ``--workers N`` serves its workers' request metrics this way on the
    control process's ``--metrics-port``.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                continue  # the text format carries them as gauges of their own
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            into = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                into[key] = into.get(key, 0.0) + sample.value
    merged = []
    for name, family in families.items():
        family.samples = [
            Sample(sample_name, dict(labels), value)
            for (sample_name, labels), value in values[name].items()
        ]
        merged.append(family)
    return merged


class EngineCollector(Collector):
    """An agent's engine counters and load, read from ``load()`` at scrape time."""

    def __init__(self, load: Callable[[], Any], in_flight: Callable[[], int]) -> None:
        self.load = load
        self.in_flight = in_flight

    def collect(self) -> Iterable[Metric]:
        load = self.load()
        requests = CounterMetricFamily(
            "omni_engine_requests", "Requests the engine ended, by outcome.", labels=["outcome"]
        )
        for outcome in ("finished", "aborted", "failed", "rejected"):
            requests.add_metric([outcome], getattr(load, outcome))
        yield requests
        yield CounterMetricFamily(
            "omni_engine_generated_tokens",
            "Tokens the engine generated.",
            value=load.generated_tokens,
        )
        yield GaugeMetricFamily("omni_engine_running", "Requests generating.", value=load.running)
        yield GaugeMetricFamily("omni_engine_waiting", "Requests queued.", value=load.waiting)
        yield GaugeMetricFamily(
            "omni_engine_kv_cache_usage_ratio",
            "Share of the KV cache in use.",
            value=load.kv_cache_usage,
        )
        yield GaugeMetricFamily(
            "omni_agent_in_flight", "Generate streams open on the agent.", value=self.in_flight()
        )


def serve_metrics(
    registry: CollectorRegistry, port: int | None, host: str, port_file: str | None
) -> int | None:
    """Serve /metrics on ``port`` (0: any free port); return the bound port."""
    if port is None:
        return None
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(f"{bound}\n")
        tmp.replace(port_file)
    log.info("metrics serving", address=f"{host}:{bound}")
    return bound
