"""Cache aware: send a prompt where its prefix is already computed, unless that node is too busy.

The strategy keeps a ``PrefixIndex`` (``coordinator/prefix.py``): for every node, the prompt
blocks it was sent, evicted least recently used first at the node's cache capacity. A request
goes to the node holding the longest prefix of its prompt. A prompt matched nowhere goes to the
node whose cache holds the least (its share of its capacity; the less loaded of equals), as
SGLang's balancer sends it to its smallest tree: new prefixes spread over the fleet's caches
instead of piling onto whichever node was idle at the moment, and once every cache is full this
is the least loaded node. Load wins over both when the chosen node is busier than the least
loaded one by more than ``balance_abs_threshold`` requests **and** more than
``balance_rel_threshold`` times (SGLang's two thresholds): a hot prefix spreads to a second node
instead of queueing on one.

``affinity_key`` is a hint: the node that last served a key wins a tie in matched blocks (a
chat session with nothing matched yet, or whose turns are not yet in whole blocks, stays where
it was), under the same load bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from coordinator.prefix import NodePrefixes, PrefixIndex, RequestPrefix
from coordinator.strategies.base import Candidate, Strategy, load
from coordinator.strategies.least_loaded import utilization

DEFAULT_BALANCE_ABS_THRESHOLD = 8
DEFAULT_BALANCE_REL_THRESHOLD = 1.5
# affinity_key -> the node that last served it, least recently used first out.
MAX_SESSIONS = 100_000


class CacheAware(Strategy):
    name = "cache_aware"

    def __init__(
        self,
        balance_abs_threshold: int = DEFAULT_BALANCE_ABS_THRESHOLD,
        balance_rel_threshold: float = DEFAULT_BALANCE_REL_THRESHOLD,
    ) -> None:
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.index = PrefixIndex()
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self._turn = 0

    def too_busy(self, chosen: Candidate, least: Candidate) -> bool:
        """Whether ``chosen`` is out of balance with the least loaded node."""
        busy, idle = load(chosen), load(least)
        return busy - idle > self.balance_abs_threshold and busy > self.balance_rel_threshold * idle

    def pick(
        self, candidates: Sequence[Candidate], key: str = "", prefix: RequestPrefix | None = None
    ) -> Candidate:
        n = len(candidates)
        start = self._turn % n
        self._turn += 1
        owner = self.sessions.get(key) if key else None
        least = best = emptiest = candidates[start]
        best_score: tuple[int, bool, float] | None = None
        emptiest_score: tuple[float, float] | None = None
        placed = False  # whether the prompt has a whole block to place anywhere
        least_load = utilization(least)
        # Ties rotate from this turn's start, so an idle cluster fills evenly.
        for offset in range(n):
            candidate = candidates[(start + offset) % n]
            used = utilization(candidate)
            if used < least_load:
                least, least_load = candidate, used
            matched, held = 0, 0.0
            if prefix is not None:
                entry = self._entry(candidate)
                chain = prefix.chain(entry.block_tokens)
                placed = placed or bool(chain)
                matched = entry.matched(chain) * entry.block_tokens
                held = len(entry.blocks) / entry.capacity_blocks
            score = (matched, candidate.node_id == owner, -used)
            if best_score is None or score > best_score:
                best, best_score = candidate, score
            if emptiest_score is None or (held, used) < emptiest_score:
                emptiest, emptiest_score = candidate, (held, used)
        assert best_score is not None
        matched, is_owner, _ = best_score
        if matched or is_owner:
            chosen = best
        elif placed:
            chosen = emptiest
        else:  # nothing to place (a prompt shorter than a block, or a plan): load alone
            chosen = least
        if self.too_busy(chosen, least):
            chosen = least
        if prefix is not None:
            entry = self._entry(chosen)
            entry.add(prefix.chain(entry.block_tokens))
        if key:
            self.sessions[key] = chosen.node_id
            self.sessions.move_to_end(key)
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return chosen

    def _entry(self, candidate: Candidate) -> NodePrefixes:
        return self.index.node(
            candidate.node_id, candidate.cache_block_tokens, candidate.cache_capacity_tokens
        )

    def forget(self, node_id: str) -> None:
        self.index.forget(node_id)

    def observe(self, node_id: str, prefix: RequestPrefix, prompt_tokens: int) -> None:
        # How many bytes its tokens take: the index sizes the node's cache by it.
        self.index.learn(node_id, prefix, prompt_tokens)
