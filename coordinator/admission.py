"""Admission: the limits a Generate call must fit before it costs anything.

Every limit, when hit, is RESOURCE_EXHAUSTED with a message naming the limit and its value,
so a client (or its operator) knows which knob was reached. The counters are per client
identity and total; an identity with nothing in flight is forgotten, so memory stays bounded
however many distinct clients come and go.

The admission queue: requests beyond what the healthy nodes can run at once (the sum of their
capacities) wait, on their engines or for a node, up to ``max_queue`` of them; more are refused
instead of piling up without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from omni_rpc import config
from omni_rpc.v1 import generate_pb2
from omni_rpc.validation import chat_text_bytes, media_bytes

# Token ids count 4 bytes each toward the prompt size limit (their size as int32 on the wire).
TOKEN_ID_BYTES = 4


@dataclass(frozen=True)
class Limits:
    max_prompt_bytes: int = config.MAX_PROMPT_BYTES
    # Media data of one request (inputs and chat media parts), not counted as prompt bytes.
    max_media_bytes: int = config.MAX_MEDIA_BYTES
    max_tokens_cap: int = config.MAX_TOKENS_CAP
    max_streams: int = config.MAX_STREAMS
    max_streams_per_client: int = config.MAX_STREAMS_PER_CLIENT
    max_queue: int = config.MAX_QUEUE


class LimitExceeded(Exception):
    """A limit was hit; the message names it."""


def prompt_bytes(request: generate_pb2.GenerateRequest) -> int:
    return (
        len(request.prompt.encode("utf-8", "surrogatepass"))
        + TOKEN_ID_BYTES * len(request.prompt_token_ids)
        + chat_text_bytes(request.messages)
    )


class Admission:
    def __init__(self, limits: Limits, capacity: Callable[[], int]) -> None:
        self.limits = limits
        self._capacity = capacity
        self.active = 0
        self._per_client: dict[str, int] = {}

    def check_request(self, request: generate_pb2.GenerateRequest) -> None:
        """Size limits of the request itself."""
        size = prompt_bytes(request)
        if size > self.limits.max_prompt_bytes:
            raise LimitExceeded(
                f"prompt is {size} bytes, over the limit max_prompt_bytes="
                f"{self.limits.max_prompt_bytes}"
            )
        media = media_bytes(request)
        if media > self.limits.max_media_bytes:
            raise LimitExceeded(
                f"media inputs are {media} bytes, over the limit max_media_bytes="
                f"{self.limits.max_media_bytes}"
            )
        if request.sampling.HasField("max_tokens"):
            wanted = request.sampling.max_tokens
            if wanted > self.limits.max_tokens_cap:
                raise LimitExceeded(
                    f"max_tokens={wanted} is over the limit max_tokens_cap="
                    f"{self.limits.max_tokens_cap}"
                )

    @contextmanager
    def admit(self, client: str) -> Iterator[None]:
        """Hold a stream slot for ``client`` while the call runs."""
        limits = self.limits
        if self.active >= limits.max_streams:
            raise LimitExceeded(
                f"{self.active} streams in flight: the limit max_streams={limits.max_streams} "
                "is reached"
            )
        mine = self._per_client.get(client, 0)
        if mine >= limits.max_streams_per_client:
            raise LimitExceeded(
                f"this client has {mine} streams in flight: the limit max_streams_per_client="
                f"{limits.max_streams_per_client} is reached"
            )
        capacity = self._capacity()
        if self.active >= capacity + limits.max_queue:
            raise LimitExceeded(
                f"every node is saturated ({self.active} requests for a capacity of {capacity}) "
                f"and the admission queue is full: the limit max_queue={limits.max_queue} is "
                "reached"
            )
        self.active += 1
        self._per_client[client] = mine + 1
        try:
            yield
        finally:
            self.active -= 1
            left = self._per_client[client] - 1
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]
