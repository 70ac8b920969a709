"""The balancer: binds a strategy to the registry's dispatchable nodes."""

from __future__ import annotations

from collections.abc import Collection

from coordinator.prefix import RequestPrefix
from coordinator.registry import Node, Registry
from coordinator.strategies import Strategy


class Balancer:
    def __init__(self, registry: Registry, strategy: Strategy) -> None:
        self.registry = registry
        self.strategy = strategy
        # A node gone (left, forgotten, replaced by a new process): what a strategy kept about
        # it (cache_aware's index of its prefixes, consistent_hash's ring) goes too.
        registry.on_removed.append(lambda node: strategy.forget(node.node_id))

    def pick(
        self,
        key: str = "",
        avoid: Collection[str] = (),
        model: str = "",
        inputs: frozenset[str] = frozenset(),
        outputs: frozenset[str] = frozenset(),
        prefix: RequestPrefix | None = None,
    ) -> Node | None:
        """A dispatchable node (serving ``model``, when given, and taking the media
        modalities ``inputs`` and producing ``outputs``), preferring those not in ``avoid``
        (nodes already tried), for a request with affinity ``key`` and prompt ``prefix``."""
        nodes = self.registry.dispatchable(model, inputs, outputs)
        if avoid:
            fresh = [n for n in nodes if n.node_id not in avoid]
            candidates = fresh or nodes
        else:
            candidates = nodes
        if not candidates:
            return None
        chosen = self.strategy.pick(candidates, key, prefix)
        assert isinstance(chosen, Node)
        return chosen

    def observe(self, node: Node, prefix: RequestPrefix, prompt_tokens: int) -> None:
        """``node`` answered the request of ``prefix`` with ``prompt_tokens`` in its usage."""
        self.strategy.observe(node.node_id, prefix, prompt_tokens)
