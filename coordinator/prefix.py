"""Prompt prefixes as chains of block hashes, and what the coordinator believes each node's
prefix cache holds.

An engine reuses a prompt's prefix in whole blocks of its KV cache (vLLM: 16 tokens on GPU,
128 on CPU). A prompt is cut the same way: block ``i``'s hash covers the prompt's start up to
the end of that block (a chain: each hash folds in the previous one), so two prompts share the
hashes of exactly the blocks they share from their start. Token-id prompts are cut in tokens;
text prompts, whose tokens only the engine knows, in ``TEXT_BYTES_PER_TOKEN`` UTF-8 bytes per
token; a chat in its turns, rendered role and content one after the other, so a chat shares
its system prompt and earlier turns with the chats that continue it. How many bytes a token
really takes depends on the tokenizer and the text (SmolLM2 makes about 6 of plain English): a
node's text blocks are then fewer tokens than the index assumes, so it learns each node's bytes
per token from the prompt token counts its answers report and scales the node's capacity by it,
or the index would believe the cache smaller than it is and forget prefixes the engine holds.

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
# Bytes per token a node's answers may teach the index (beyond it: not a text prompt's tokens).
MIN_LEARNED_BYTES_PER_TOKEN = 1.0
MAX_LEARNED_BYTES_PER_TOKEN = 16.0
# Weight of each new observation in a node's learned bytes per token.
LEARN_WEIGHT = 0.1
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


def _text_bytes(request: generate_pb2.GenerateRequest) -> bytes:
    return _chat_bytes(request.messages) if request.messages else request.prompt.encode()


def prefix_chain(
    request: generate_pb2.GenerateRequest, block_tokens: int, text: bytes | None = None
) -> list[int]:
    """The hashes of ``request``'s whole prompt blocks of ``block_tokens`` tokens, in order
    (``text``: the request's prompt bytes, when already rendered)."""
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
    data = _text_bytes(request) if text is None else text
    size = block_tokens * TEXT_BYTES_PER_TOKEN
    whole = len(data) - len(data) % size
    return _chain((data[i : i + size] for i in range(0, whole, size)), seed + b"text")


class RequestPrefix:
    """One request's chains, cut once per block size its candidates use."""

    __slots__ = ("_chains", "_text", "request")

    def __init__(self, request: generate_pb2.GenerateRequest) -> None:
        self.request = request
        self._chains: dict[int, list[int]] = {}
        self._text: bytes | None = None

    @property
    def text_bytes(self) -> int:
        """The length of the prompt as the index cuts it, in bytes (0: a token-id prompt)."""
        if self.request.prompt_token_ids:
            return 0
        return len(self._rendered())

    def _rendered(self) -> bytes:
        if self._text is None:
            self._text = _text_bytes(self.request)
        return self._text

    def chain(self, block_tokens: int) -> list[int]:
        chain = self._chains.get(block_tokens)
        if chain is None:
            text = None if self.request.prompt_token_ids else self._rendered()
            chain = self._chains[block_tokens] = prefix_chain(self.request, block_tokens, text)
        return chain


class NodePrefixes:
    """The blocks one node is believed to hold, least recently used first."""

    __slots__ = ("block_tokens", "blocks", "bytes_per_token", "capacity_blocks", "capacity_tokens")

    def __init__(self, block_tokens: int, capacity_tokens: int) -> None:
        self.block_tokens = max(1, block_tokens or DEFAULT_BLOCK_TOKENS)
        self.capacity_tokens = max(0, capacity_tokens)
        # What a token of this node's text prompts takes, learned from its answers' usage.
        self.bytes_per_token = float(TEXT_BYTES_PER_TOKEN)
        self.capacity_blocks = 0
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self._resize()

    def _resize(self) -> None:
        # A text block of the index is block_tokens * TEXT_BYTES_PER_TOKEN bytes: with more
        # bytes per token the engine's blocks hold more of them (and fewer with less).
        scale = self.bytes_per_token / TEXT_BYTES_PER_TOKEN
        by_capacity = int(self.capacity_tokens * scale) // self.block_tokens
        self.capacity_blocks = min(by_capacity or MAX_BLOCKS_PER_NODE, MAX_BLOCKS_PER_NODE)

    def learn(self, text_bytes: int, prompt_tokens: int) -> None:
        """A text prompt of ``text_bytes`` bytes (as the index renders it) was
        ``prompt_tokens`` tokens on this node."""
        if text_bytes <= 0 or prompt_tokens < self.block_tokens:
            return  # a short prompt's chat template weighs more than its text
        seen = min(
            max(text_bytes / prompt_tokens, MIN_LEARNED_BYTES_PER_TOKEN),
            MAX_LEARNED_BYTES_PER_TOKEN,
        )
        self.bytes_per_token += LEARN_WEIGHT * (seen - self.bytes_per_token)
        self._resize()
        self._trim()

    def matched(self, chain: Sequence[int]) -> int:
        """How many of ``chain``'s first blocks the node holds."""
        count = 0
        for block in chain:
            if block not in self.blocks:
                break
            count += 1
        return count

    def add(self, chain: Sequence[int]) -> None:
        """The node computed (or reused) these blocks: most recently used now.

        Touched tail first, head last, as the engines free a request's blocks: over capacity
        a prompt's tail goes before its head, so a shared head (a system prompt) stays while
        the turns that continued it are evicted. The other way round would forget a whole
        prompt at once (``matched`` stops at the first missing block) while the engine still
        holds most of it.
        """
        blocks = self.blocks
        for block in reversed(chain):
            if block in blocks:
                blocks.move_to_end(block)
            else:
                blocks[block] = None
        self._trim()

    def _trim(self) -> None:
        blocks = self.blocks
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

    def learn(self, node_id: str, prefix: RequestPrefix, prompt_tokens: int) -> None:
        """``prefix``'s prompt was ``prompt_tokens`` tokens on the node (its usage said so)."""
        entry = self.nodes.get(node_id)
        if entry is not None:
            entry.learn(prefix.text_bytes, prompt_tokens)

    @property
    def size(self) -> int:
        """Blocks held in all, over every node (the index's memory is about 100 bytes each)."""
        return sum(len(n.blocks) for n in self.nodes.values())
