"""Prompt prefixes as chains of block hashes, and what the coordinator believes each node's
prefix cache holds.

An engine reuses a prompt's prefix in whole blocks of its KV cache (vLLM: 16 tokens on GPU,
128 on CPU). A prompt is cut the same way: block ``i``'s hash covers the prompt's start up to
the end of that block (a chain: each hash folds in the previous one), so two prompts share the
hashes of exactly the blocks they share from their start. Token-id prompts are cut in tokens;
text prompts, whose tokens only the engine knows, in ``TEXT_BYTES_PER_TOKEN`` UTF-8 bytes per
token; a chat in its turns, rendered role and content one after the other, so a chat shares
its system prompt and earlier turns with the chats that continue it.

``PrefixIndex`` is the coordinator's approximate view of every node's cache: the chains of the
prompts it sent there, least recently used first out once a node's capacity (its engine's
cache size, as its join said, within ``MAX_BLOCKS_PER_NODE``) is full, which is what the
engines' own LRU eviction does. It is a belief, not a report: a node that restarted, or evicted
early, costs a cache miss there, never a wrong answer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from omni_rpc.v1 import generate_pb2

# A token of a text prompt, counted in UTF-8 bytes (about what a BPE tokenizer averages).
TEXT_BYTES_PER_TOKEN = 4
# Block size of a node whose join did not say (vLLM's default on GPUs).
DEFAULT_BLOCK_TOKENS = 16
# A prompt's first blocks only: enough for long shared system prompts, bounded work per request.
MAX_PREFIX_BLOCKS = 512
# Each node's share of the index, in blocks (about 100 bytes each): a node that reported no
# capacity, or a larger one, is held to this.
MAX_BLOCKS_PER_NODE = 32_768


def _chain(pieces: Iterable[bytes], seed: bytes) -> list[int]:
    hashes: list[int] = []
    previous = seed
    for piece in pieces:
        digest = hashlib.blake2b(previous + piece, digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "big"))
        previous = digest
        if len(hashes) >= MAX_PREFIX_BLOCKS:
            break
    return hashes


def _chat_bytes(messages: Sequence[generate_pb2.ChatMessage]) -> bytes:
    out = bytearray()
    for message in messages:
        out += message.role.encode() + b"\0"
        if message.parts:
            for part in message.parts:
                if part.WhichOneof("part") == "text":
                    out += part.text.encode()
                else:  # media: its bytes stand in (a different image is a different prefix)
                    out += hashlib.blake2b(part.media.data, digest_size=8).digest()
        else:
            out += message.content.encode()
        out += b"\0"
    return bytes(out)


def prefix_chain(request: generate_pb2.GenerateRequest, block_tokens: int) -> list[int]:
    """The hashes of ``request``'s whole prompt blocks of ``block_tokens`` tokens, in order."""
    block_tokens = max(1, block_tokens)
    # Which model reads the prompt is part of the prefix: another model's cache is not this one.
    seed = request.model.encode()
    if request.prompt_token_ids:
        ids = request.prompt_token_ids
        whole = len(ids) - len(ids) % block_tokens
        return _chain(
            (
                b",".join(str(t).encode() for t in ids[i : i + block_tokens])
                for i in range(0, whole, block_tokens)
            ),
            seed + b"ids",
        )
    data = _chat_bytes(request.messages) if request.messages else request.prompt.encode()
    size = block_tokens * TEXT_BYTES_PER_TOKEN
    whole = len(data) - len(data) % size
    return _chain((data[i : i + size] for i in range(0, whole, size)), seed + b"text")


class RequestPrefix:
    """One request's chains, cut once per block size its candidates use."""

    __slots__ = ("_chains", "request")

    def __init__(self, request: generate_pb2.GenerateRequest) -> None:
        self.request = request
        self._chains: dict[int, list[int]] = {}

    def chain(self, block_tokens: int) -> list[int]:
        chain = self._chains.get(block_tokens)
        if chain is None:
            chain = self._chains[block_tokens] = prefix_chain(self.request, block_tokens)
        return chain


class NodePrefixes:
    """The blocks one node is believed to hold, least recently used first."""

    __slots__ = ("block_tokens", "blocks", "capacity_blocks")

    def __init__(self, block_tokens: int, capacity_tokens: int) -> None:
        self.block_tokens = max(1, block_tokens or DEFAULT_BLOCK_TOKENS)
        by_capacity = capacity_tokens // self.block_tokens if capacity_tokens > 0 else 0
        self.capacity_blocks = min(by_capacity or MAX_BLOCKS_PER_NODE, MAX_BLOCKS_PER_NODE)
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def matched(self, chain: Sequence[int]) -> int:
        """How many of ``chain``'s first blocks the node holds."""
        count = 0
        for block in chain:
            if block not in self.blocks:
                break
            count += 1
        return count

    def add(self, chain: Sequence[int]) -> None:
        """The node computed (or reused) these blocks: most recently used now."""
        blocks = self.blocks
        for block in chain:
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)


class PrefixIndex:
    """Every node's ``NodePrefixes``, by node id."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodePrefixes] = {}

    def node(self, node_id: str, block_tokens: int, capacity_tokens: int) -> NodePrefixes:
        """The node's entry, new (empty) when it is not known or its cache changed shape."""
        entry = self.nodes.get(node_id)
        if entry is None or entry.block_tokens != max(1, block_tokens or DEFAULT_BLOCK_TOKENS):
            entry = self.nodes[node_id] = NodePrefixes(block_tokens, capacity_tokens)
        return entry

    def forget(self, node_id: str) -> None:
        """The node left (or was replaced): what it held is gone with it."""
        self.nodes.pop(node_id, None)

    @property
    def size(self) -> int:
        """Blocks held in all, over every node (the index's memory is about 100 bytes each)."""
        return sum(len(n.blocks) for n in self.nodes.values())
