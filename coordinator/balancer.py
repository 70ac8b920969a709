"""The balancer: binds a strategy to the registry's dispatchable nodes."""

from __future__ import annotations

from collections.abc import Collection

from coordinator.registry import Node, Registry
from coordinator.strategies import Strategy


class Balancer:
    def __init__(self, registry: Registry, strategy: Strategy) -> None:
        self.registry = registry
        self.strategy = strategy

    def pick(
        self,
        key: str = "",
        avoid: Collection[str] = (),
        model: str = "",
        inputs: frozenset[str] = frozenset(),
        outputs: frozenset[str] = frozenset(),
    ) -> Node | None:
        """A dispatchable node (serving ``model``, when given, and taking the media
        modalities ``inputs`` and producing ``outputs``), preferring those not in ``avoid``
        (nodes already tried)."""
        nodes = self.registry.dispatchable(model, inputs, outputs)
        if avoid:
            fresh = [n for n in nodes if n.node_id not in avoid]
            candidates = fresh or nodes
        else:
            candidates = nodes
        if not candidates:
            return None
        chosen = self.strategy.pick(candidates, key)
        assert isinstance(chosen, Node)
        return chosen
