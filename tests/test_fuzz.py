"""Fuzzing: every RPC of every service, against a live cluster.

A coordinator and two simulated agents run as processes on loopback (one cluster for the
module). For each method of omni.v1.Coordinator, omni.v1.Registry and grpc.health.v1.Health
(on the coordinator) and of omni.v1.NodeAgent and grpc.health.v1.Health (on an agent, called
directly), Hypothesis sends messages built from the protobuf descriptors (see
``tests/fuzz_strategies.py``), requests steered to get past validation, and random bytes as
serialized messages (streaming methods as streams). Every call must end with a status within
its deadline; UNKNOWN (an unhandled exception in a servicer) and INTERNAL carrying exception
text are failures. Joins, leaves and drains of junk nodes are also fuzzed as sequences mixed
with requests. After each test: every process alive, every server SERVING, both real nodes
healthy, a normal Generate exact (also with request ids the fuzzing used), no generation left
running, and no traceback or error in the servers' logs. A second cluster with bearer-token
auth is fuzzed with every kind of credential, checking the role policy on every method.

Deterministic (``derandomize``) and bounded: ``OMNI_FUZZ_EXAMPLES`` examples per test (per
method and kind of input; default 100, about 40 s on 2 cores); ``make fuzz`` runs 2000 (about
7 min). A failing example is reported as found; ``OMNI_FUZZ_SHRINK=1`` shrinks it first (slow:
every step runs against the live servers).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from node_agent.engines.sim import simulate
from omni_rpc import config
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.v1 import (
    coordinator_pb2,
    generate_pb2,
    node_agent_pb2,
    node_pb2,
    registry_pb2,
)
from tests.conftest import FAST_SIM, wait_healthy, wait_until
from tests.fuzz_strategies import (
    Strategy,
    integers,
    lists,
    message_strategy,
    raw_bytes,
    text,
    weighted,
)

EXAMPLES = int(os.environ.get("OMNI_FUZZ_EXAMPLES", "100"))
# Every call must end (with any status) within this.
CALL_TIMEOUT_S = 5.0
# Streams are cancelled after this many responses: a legitimately long generation is not a hang.
MAX_STREAM_MESSAGES = 20
REAL_NODES = ("node-0", "node-1")
# Ids that fuzzed Join, Leave and DrainNode calls share, so they meet each other's nodes.
JUNK_NODES = ("junk-0", "junk-1", "junk-2")
# Request ids fuzzed calls reuse: the checks after each method send a normal request with
# each of them, so state a cancelled or failed request leaves behind under its id shows.
REQUEST_IDS = ("fuzz-request-0", "fuzz-request-1")

Metadata = tuple[tuple[str, str | bytes], ...]

# Shrinking re-runs calls against live servers many times (minutes); the failing example is
# reported as found unless OMNI_FUZZ_SHRINK=1.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("OMNI_FUZZ_SHRINK") == "1":
    PHASES.append(Phase.shrink)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=PHASES,
    # The function-scoped fixture (checked) runs once per test, around all its examples: meant.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)

# --- what is fuzzed --------------------------------------------------------------------------

COORDINATOR = "coordinator"
AGENT = "agent"
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
SERVICES: dict[str, list[ServiceDescriptor]] = {
    COORDINATOR: [
        coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
        registry_pb2.DESCRIPTOR.services_by_name["Registry"],
        HEALTH,
    ],
    AGENT: [node_agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"], HEALTH],
}


@dataclass(frozen=True)
class Target:
    server: str
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)

    def __str__(self) -> str:
        return f"{self.server}:{self.path}"


# Streams that stay open, by design, for as long as the client keeps its half open (the
# agent's multiplexed Session lives as long as the coordinator's connection): holding them
# open is the normal case, not a hang; they are fuzzed with the client half closed, which ends
# the session (every request on it aborted) and must answer a status.
LONG_LIVED = {"/omni.v1.NodeAgent/Session"}

TARGETS = [
    Target(server, method)
    for server, services in SERVICES.items()
    for service in services
    for method in service.methods
]


def test_every_method_of_every_service_is_fuzzed() -> None:
    names = {t.path for t in TARGETS}
    assert "/omni.v1.Coordinator/Generate" in names
    assert "/omni.v1.Registry/Join" in names
    assert "/omni.v1.NodeAgent/Generate" in names
    assert "/grpc.health.v1.Health/Watch" in names
    assert len(TARGETS) == sum(len(s.methods) for ss in SERVICES.values() for s in ss)


def _not_real(s: str) -> bool:
    return s not in REAL_NODES


def _node_ids(real: bool = False) -> st.SearchStrategy[str]:
    """Node ids for calls with side effects: a real node's only where ``real`` (draining or
    removing one would be the fuzzer's doing, not a bug; a Join with a real node's id from
    another address must be refused while that node is healthy)."""
    junk = weighted((3, st.sampled_from(JUNK_NODES)), (2, text().filter(_not_real)))
    return weighted((5, junk), (1, st.sampled_from(REAL_NODES))) if real else junk


def _request_ids() -> st.SearchStrategy[str]:
    return weighted((2, st.sampled_from(REQUEST_IDS)), (1, text()))


def _plausible_generate() -> st.SearchStrategy[Message]:
    """GenerateRequests that mostly pass validation, so the fuzzing reaches the engines."""
    sampling = "omni.v1.SamplingParams."
    request = "omni.v1.GenerateRequest."
    overrides: dict[str, Strategy] = {
        request + "request_id": _request_ids(),
        request + "max_retries": st.none() | integers(0, 3),
        request + "inputs": st.just([])
        | st.lists(message_strategy(generate_pb2.Media.DESCRIPTOR), max_size=2),
        sampling + "max_tokens": st.none() | integers(1, 64) | st.just(config.MAX_TOKENS_CAP),
        # Invalid ones too, but not so large that a long generation sends fewer than
        # MAX_STREAM_MESSAGES messages within CALL_TIMEOUT_S (a slow stream, not a hang).
        request + "stream_interval": st.none() | integers(-2, 64),
        sampling + "temperature": st.none() | st.floats(0.0, 2.0, width=32),
        sampling + "top_p": st.none() | st.floats(0.0, 1.0, width=32, exclude_min=True),
        sampling + "top_k": st.none() | integers(-1, 100),
        sampling + "stop": st.lists(text().filter(bool), max_size=3),
    }
    with_prompt = {
        **overrides,
        request + "prompt": st.text(min_size=1, max_size=64) | text().filter(bool),
        request + "prompt_token_ids": st.just([]),
    }
    with_token_ids = {
        **overrides,
        request + "prompt": st.just(""),
        request + "prompt_token_ids": st.lists(integers(0, 2**31 - 1), min_size=1, max_size=50),
    }
    descriptor = generate_pb2.GenerateRequest.DESCRIPTOR
    return st.one_of(
        message_strategy(descriptor, with_prompt), message_strategy(descriptor, with_token_ids)
    )


def _plausible_agent_request() -> st.SearchStrategy[Message]:
    """A first AgentRequest that carries a (plausible) request, maybe resuming a stream."""

    def combine(generate: Message, resume: Message, attempt: int) -> Message:
        first = node_agent_pb2.AgentRequest(attempt=attempt)
        first.generate.MergeFrom(generate)  # type: ignore[arg-type]
        first.resume.MergeFrom(resume)  # type: ignore[arg-type]
        return first

    resume = message_strategy(
        generate_pb2.Resume.DESCRIPTOR,
        {"omni.v1.Resume.token_ids": lists(integers(0, 4095), many=80)},
    )
    return st.builds(
        combine, _plausible_generate(), st.just(generate_pb2.Resume()) | resume, integers(0, 5)
    )


def _addresses(live: Live) -> st.SearchStrategy[str]:
    """Addresses for Join: well formed (a closed port, a real agent's, the coordinator's own,
    odd hosts) or anything."""
    well_formed = st.one_of(
        st.sampled_from(
            [
                "127.0.0.1:1",
                "localhost:1",
                "[::1]:1",
                "127.0.0.1:\u0661\u0662",  # digits to str.isdigit(), not to a resolver
                "unix:/nonexistent:1",
                "dns:///localhost:1",
                live.cluster.coordinator_address,
                *live.agent_addresses.values(),
            ]
        ),
        st.builds(lambda h, p: f"{h}:{p}", text().filter(bool), integers(0, 2**31 - 1)),
    )
    return weighted((3, well_formed), (1, text()))


def _overrides(target: Target, live: Live) -> dict[str, Strategy]:
    if target.path == "/omni.v1.Registry/Join":
        return {
            "omni.v1.JoinRequest.node_id": _node_ids(real=True),
            "omni.v1.JoinRequest.address": _addresses(live),
        }
    if target.path == "/omni.v1.Registry/Leave":
        return {
            "omni.v1.LeaveRequest.node_id": _node_ids(),
            "omni.v1.LeaveRequest.address": st.just("") | _addresses(live),
        }
    if target.path == "/omni.v1.Coordinator/DrainNode":
        return {"omni.v1.DrainNodeRequest.node_id": _node_ids()}
    return {}


def _harmless_bytes(target: Target) -> Callable[[bytes], bool]:
    """For calls with side effects, refuse bytes that parse to a request naming a real node."""

    def ok(data: bytes) -> bool:
        if target.path not in SIDE_EFFECTS:
            return True
        message = target.request_class()
        try:
            message.ParseFromString(data)
        except DecodeError:
            return True
        return target.path.endswith("/Join") or getattr(message, "node_id", "") not in REAL_NODES

    return ok


SIDE_EFFECTS = {
    "/omni.v1.Registry/Join",
    "/omni.v1.Registry/Leave",
    "/omni.v1.Coordinator/DrainNode",
}


def message_requests(target: Target, live: Live) -> st.SearchStrategy[list[bytes]]:
    """Serialized requests from the descriptors: one, or a stream of 1-4 for client streams."""
    one = message_strategy(target.method.input_type, _overrides(target, live))
    if target.path == "/omni.v1.Coordinator/Generate":
        one = st.one_of(one, _plausible_generate())
    if target.method.client_streaming:
        first = one
        if target.path == "/omni.v1.NodeAgent/Generate":
            first = st.one_of(one, _plausible_agent_request())
        stream = st.tuples(first, st.lists(one, max_size=3)).map(lambda t: [t[0], *t[1]])
        return stream.map(lambda ms: [m.SerializeToString() for m in ms])
    return one.map(lambda m: [m.SerializeToString()])


def byte_requests(target: Target, live: Live) -> st.SearchStrategy[list[bytes]]:
    one = raw_bytes().filter(_harmless_bytes(target))
    if target.method.client_streaming:
        return st.lists(one, min_size=0, max_size=4)
    return one.map(lambda b: [b])


# --- the live cluster --------------------------------------------------------------------------


@dataclass
class Live:
    cluster: LocalCluster
    agent_addresses: dict[str, str]
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    # Log lines already checked, per file.
    log_offsets: dict[Path, int] = field(default_factory=dict)
    strategies: dict[tuple[str, Target], st.SearchStrategy[list[bytes]]] = field(
        default_factory=dict
    )

    def strategy(
        self,
        key: tuple[str, Target],
        make: Callable[[Target, Live], st.SearchStrategy[list[bytes]]],
    ) -> st.SearchStrategy[list[bytes]]:
        """The strategy ``make`` builds for a target, built once."""
        if key not in self.strategies:
            self.strategies[key] = make(key[1], self)
        return self.strategies[key]

    def channel(self, server: str) -> grpc.Channel:
        """The coordinator, or node-0's agent (called directly)."""
        if server not in self.channels:
            address = (
                self.cluster.coordinator_address
                if server == COORDINATOR
                else self.agent_addresses[REAL_NODES[0]]
            )
            self.channels[server] = grpc.insecure_channel(
                address, options=config.GRPC_MESSAGE_OPTIONS
            )
        return self.channels[server]

    def metadata(self, role: str) -> Metadata:
        """Call metadata with the cluster's token of ``role`` (none when auth is off)."""
        token = self.cluster.tokens.get(role)
        return (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def _start(tmp_path_factory: pytest.TempPathFactory, auth: bool) -> Iterator[Live]:
    cluster = LocalCluster(
        num_nodes=len(REAL_NODES),
        log_dir=tmp_path_factory.mktemp("fuzz-cluster-auth" if auth else "fuzz-cluster"),
        agent_args=FAST_SIM,
        health_check_interval=0.5,
        auth=auth,
    )
    state: Live | None = None
    try:
        cluster.start()
        wait_healthy(cluster, len(REAL_NODES))
        state = Live(cluster, {})
        nodes = _unary(
            state.channel(COORDINATOR),
            "/omni.v1.Coordinator/ListNodes",
            coordinator_pb2.ListNodesRequest(),
            coordinator_pb2.ListNodesResponse,
            state.metadata("admin"),
        ).nodes
        state.agent_addresses.update((n.node_id, n.address) for n in nodes)
        yield state
    finally:
        if state is not None:
            state.close()
        cluster.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A coordinator and two agents, auth off."""
    yield from _start(tmp_path_factory, auth=False)


@pytest.fixture(scope="module")
def live_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A coordinator and two agents, bearer tokens required."""
    yield from _start(tmp_path_factory, auth=True)


# --- one call ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    # We cancelled a stream that was still going (after MAX_STREAM_MESSAGES, or a Watch).
    cut_short: bool
    elapsed_s: float


def call(
    live: Live,
    target: Target,
    requests: Sequence[bytes],
    hold_open: bool = False,
    metadata: Metadata | None = None,
) -> Outcome:
    """Send ``requests`` (serialized) to ``target``; collect what comes back. Without
    ``metadata``, the call carries the token of a role allowed to make it."""
    if metadata is None:
        metadata = live.metadata(
            "node" if target.server == AGENT or "/omni.v1.Registry/" in target.path else "admin"
        )
    channel = live.channel(target.server)
    started = time.monotonic()
    responses: list[bytes] = []
    cut_short = False
    done = threading.Event()
    # The Health Watch stream only ends when the client goes: one message is the whole answer.
    limit = 1 if target.method.name == "Watch" else MAX_STREAM_MESSAGES

    def request_stream() -> Iterator[bytes]:
        yield from requests
        if hold_open:  # keep the client half of the stream open until we are done reading
            done.wait(CALL_TIMEOUT_S * 2)

    try:
        if not target.method.server_streaming:
            if target.method.client_streaming:
                response = channel.stream_unary(target.path, None, None)(
                    request_stream(), timeout=CALL_TIMEOUT_S, metadata=metadata
                )
            else:
                response = channel.unary_unary(target.path, None, None)(
                    requests[0], timeout=CALL_TIMEOUT_S, metadata=metadata
                )
            responses.append(response)
            return Outcome(grpc.StatusCode.OK, "", responses, False, time.monotonic() - started)
        stream: Any
        if target.method.client_streaming:
            stream = channel.stream_stream(target.path, None, None)(
                request_stream(), timeout=CALL_TIMEOUT_S, metadata=metadata
            )
        else:
            stream = channel.unary_stream(target.path, None, None)(
                requests[0], timeout=CALL_TIMEOUT_S, metadata=metadata
            )
        for response in stream:
            responses.append(response)
            if len(responses) >= limit:
                cut_short = True
                stream.cancel()
                break
        if cut_short:
            code, details = grpc.StatusCode.OK, ""
        else:
            code, details = stream.code(), stream.details() or ""
        return Outcome(code, details, responses, cut_short, time.monotonic() - started)
    except grpc.RpcError as exc:
        error: Any = exc  # grpc.RpcError subclasses are also grpc.Call
        return Outcome(
            error.code(), error.details() or "", responses, cut_short, time.monotonic() - started
        )
    finally:
        done.set()


_EXCEPTION_TEXT = re.compile(r"Traceback|Unexpected <class|Exception|Error\b")


def check_outcome(target: Target, requests: Sequence[bytes], outcome: Outcome) -> None:
    what = f"{target} with {[r[:200] for r in requests]!r}"
    assert outcome.elapsed_s < CALL_TIMEOUT_S + 2, f"{what}: took {outcome.elapsed_s:.1f}s"
    assert outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: hung ({outcome.details})"
    # Undecodable bytes too: the servers answer INVALID_ARGUMENT (omni_rpc/servers.py).
    assert outcome.code != grpc.StatusCode.UNKNOWN, (
        f"{what}: UNKNOWN (unhandled exception in the server): {outcome.details}"
    )
    if outcome.code == grpc.StatusCode.INTERNAL:
        assert not _EXCEPTION_TEXT.search(outcome.details), (
            f"{what}: INTERNAL with exception text: {outcome.details}"
        )
    for data in outcome.responses:
        target.response_class().ParseFromString(data)  # raises if the server sent garbage
    if (
        target.path.endswith("/Generate")
        and outcome.code == grpc.StatusCode.OK
        and not outcome.cut_short
    ):
        assert outcome.responses, f"{what}: a stream that ended OK with no response"
        last = generate_pb2.GenerateResponse.FromString(outcome.responses[-1])
        assert last.finish_reason in ("stop", "length", "abort"), (
            f"{what}: stream ended OK without a finish_reason: {last}"
        )


# --- the checks after fuzzing a method --------------------------------------------------------

# A traceback in a log, up to the exception line that ends it.
_TRACEBACK = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*(.*)")
# Tracebacks grpc logs for calls that never reach our code; each is also answered with a
# proper status. Tolerated (grpc's own noise; none reach our code):
KNOWN_LIBRARY_TRACEBACKS = [
    # a streamed response written as the client cancels: grpc.aio's write loses the race with
    # its own cancellation of the handler and logs "ExecuteBatchError raised in core" (benign:
    # the call is over; the handler is closed and the engine request aborted as usual)
    re.compile(
        r"in _finish_handler_with_stream_responses\n(?:[ \t].*\n)*"
        r"grpc\._cython\.cygrpc\.ExecuteBatchError: Failed \"execute_batch\": "
        r"\(<grpc\._cython\.cygrpc\.SendMessageOperation object at 0x[0-9a-f]+>,\)$"
    ),
]


def _known(traceback: str) -> bool:
    return any(known.search(traceback) for known in KNOWN_LIBRARY_TRACEBACKS)


def log_problems(live: Live) -> list[str]:
    """Tracebacks, errors and exceptions logged by the servers since the last check (as
    plain text or as JSON lines with an ``exception`` field)."""
    problems = []
    for path in sorted(Path(live.cluster.log_dir or ".").glob("*.log")):
        start = live.log_offsets.get(path, 0)
        with path.open("rb") as log:
            log.seek(start)
            content = log.read()
        end = content.rfind(b"\n") + 1  # a line being written is read next time
        live.log_offsets[path] = start + end
        new = content[:end].decode(errors="replace")
        for match in _TRACEBACK.finditer(new):
            if not _known(match.group(0)):
                problems.append(f"{path.name}: {match.group(0)}")
        for line in new.splitlines():
            try:
                record = json.loads(line) if line.startswith("{") else None
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                continue
            exception = str(record.get("exception", ""))
            if record.get("level") in ("error", "critical") or exception:
                if exception and _known(exception.rstrip("\n")):
                    continue
                problems.append(f"{path.name}: {line}")
    return problems


def _health(channel: grpc.Channel, service: str) -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response: health_pb2.HealthCheckResponse = check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(response.status)


def _unary(
    channel: grpc.Channel,
    path: str,
    request: Message,
    response: type[Message],
    metadata: Metadata = (),
) -> Any:
    method = channel.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )
    return method(request, timeout=5, metadata=metadata)


def normal_generate(live: Live, request_id: str, agent: str = "") -> None:
    """A well-formed request gets exactly the simulated engine's output (through the
    coordinator, or straight from ``agent``'s NodeAgent service)."""
    prompt = "after the fuzzing"
    request = generate_pb2.GenerateRequest(
        request_id=request_id, prompt=prompt, sampling=generate_pb2.SamplingParams(max_tokens=8)
    )
    responses: list[generate_pb2.GenerateResponse]
    if agent:
        with grpc.insecure_channel(live.agent_addresses[agent]) as channel:
            generate_on_agent = channel.stream_stream(
                "/omni.v1.NodeAgent/Generate",
                request_serializer=node_agent_pb2.AgentRequest.SerializeToString,
                response_deserializer=generate_pb2.GenerateResponse.FromString,
            )
            first = node_agent_pb2.AgentRequest(generate=request)
            responses = list(
                generate_on_agent(iter([first]), timeout=10, metadata=live.metadata("node"))
            )
    else:
        generate = live.channel(COORDINATOR).unary_stream(
            "/omni.v1.Coordinator/Generate",
            request_serializer=generate_pb2.GenerateRequest.SerializeToString,
            response_deserializer=generate_pb2.GenerateResponse.FromString,
        )
        responses = list(generate(request, timeout=10, metadata=live.metadata("client")))
    expected = simulate(prompt, max_tokens=8)
    assert [t for r in responses for t in r.token_ids] == expected.token_ids, (
        request_id,
        responses,
    )
    assert "".join(r.text for r in responses) == expected.text
    assert responses[-1].finish_reason == "length", (request_id, responses[-1])
    assert responses[-1].node_id in REAL_NODES


def wait_idle(live: Live) -> None:
    """Wait until no generation is left running on an agent and no request is in flight on
    the coordinator (cancelled calls must not leave work behind)."""

    def idle() -> bool:
        for address in live.agent_addresses.values():
            with grpc.insecure_channel(address) as channel:
                load = _unary(
                    channel,
                    "/omni.v1.NodeAgent/GetLoad",
                    node_agent_pb2.GetLoadRequest(),
                    node_pb2.NodeLoad,
                    live.metadata("node"),
                )
                if load.running or load.waiting:
                    return False
        stats = _unary(
            live.channel(COORDINATOR),
            "/omni.v1.Coordinator/GetStats",
            coordinator_pb2.GetStatsRequest(),
            coordinator_pb2.ClusterStats,
            live.metadata("client"),
        )
        return int(stats.in_flight) == 0

    wait_until(idle, 10.0, "agents and coordinator idle")


def remove_junk(live: Live, keep: Sequence[str] = ()) -> None:
    """Make every node fuzzed Joins registered leave, except real nodes and ``keep``."""
    nodes = _unary(
        live.channel(COORDINATOR),
        "/omni.v1.Coordinator/ListNodes",
        coordinator_pb2.ListNodesRequest(),
        coordinator_pb2.ListNodesResponse,
        live.metadata("client"),
    ).nodes
    for node in nodes:
        if node.node_id not in REAL_NODES and node.node_id not in keep:
            _unary(
                live.channel(COORDINATOR),
                "/omni.v1.Registry/Leave",
                registry_pb2.LeaveRequest(node_id=node.node_id, reason="fuzz cleanup"),
                registry_pb2.LeaveResponse,
                live.metadata("node"),
            )


def check_cluster(live: Live) -> None:
    """Everything still works after the fuzzing."""
    cluster = live.cluster
    cluster.check_alive()
    serving = health_pb2.HealthCheckResponse.SERVING
    coordinator = live.channel(COORDINATOR)
    for service in ("", config.COORDINATOR_SERVICE, config.REGISTRY_SERVICE):
        assert _health(coordinator, service) == serving, f"coordinator {service!r}"
    for node_id, address in live.agent_addresses.items():
        with grpc.insecure_channel(address) as channel:
            for service in ("", config.NODE_AGENT_SERVICE):
                assert _health(channel, service) == serving, f"{node_id} {service!r}"
    nodes = _unary(
        coordinator,
        "/omni.v1.Coordinator/ListNodes",
        coordinator_pb2.ListNodesRequest(),
        coordinator_pb2.ListNodesResponse,
        live.metadata("client"),
    ).nodes
    states = {n.node_id: n.state for n in nodes}
    for node_id in REAL_NODES:
        assert states.get(node_id) == coordinator_pb2.NODE_STATE_HEALTHY, (node_id, states)
    for request_id in (*REQUEST_IDS, "", uuid.uuid4().hex):
        normal_generate(live, request_id)
    for node_id in REAL_NODES:
        for request_id in REQUEST_IDS:
            normal_generate(live, request_id, agent=node_id)

    wait_idle(live)
    # Junk nodes fuzzed Joins registered: gone, so the next test starts from a clean cluster.
    remove_junk(live)
    problems = log_problems(live)
    assert not problems, f"the servers logged {len(problems)} problem(s), the first:\n" + "\n".join(
        p[:3000] for p in problems[:3]
    )


# --- the tests ----------------------------------------------------------------------------------


@pytest.fixture
def checked(live: Live) -> Iterator[Live]:
    """The cluster, checked before the test (so nothing an earlier test left is blamed on
    this one) and after it."""
    check_cluster(live)
    yield live
    check_cluster(live)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@FUZZ_SETTINGS
@given(data=st.data(), hold_open=st.booleans())
def test_fuzz_messages(checked: Live, target: Target, data: st.DataObject, hold_open: bool) -> None:
    """Messages built from the descriptors, every field fuzzed."""
    requests = data.draw(checked.strategy(("messages", target), message_requests), "requests")
    hold_open = hold_open and target.path not in LONG_LIVED
    outcome = call(checked, target, requests, hold_open)
    event(f"status {outcome.code.name}")  # pytest --hypothesis-show-statistics
    check_outcome(target, requests, outcome)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@FUZZ_SETTINGS
@given(data=st.data(), hold_open=st.booleans())
def test_fuzz_bytes(checked: Live, target: Target, data: st.DataObject, hold_open: bool) -> None:
    """Random bytes sent as serialized requests."""
    requests = data.draw(checked.strategy(("bytes", target), byte_requests), "requests")
    if not requests and not target.method.client_streaming:
        requests = [b""]
    hold_open = hold_open and bool(requests) and target.path not in LONG_LIVED
    outcome = call(checked, target, requests, hold_open)
    event(f"status {outcome.code.name}")
    check_outcome(target, requests, outcome)


MEMBERSHIP = (
    "/omni.v1.Registry/Join",
    "/omni.v1.Registry/Leave",
    "/omni.v1.Coordinator/DrainNode",
    "/omni.v1.Coordinator/ListNodes",
    "/omni.v1.Coordinator/GetStats",
    "/omni.v1.Coordinator/Generate",
)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_membership_sequences(checked: Live, data: st.DataObject) -> None:
    """Joins, leaves and drains of junk nodes (some at a real agent's address, so they serve
    requests) mixed with requests, in any order: the registry must keep serving."""
    remove_junk(checked, keep=JUNK_NODES)  # junk with random ids would pile up
    targets = [t for t in TARGETS if t.server == COORDINATOR and t.path in MEMBERSHIP]
    steps = data.draw(st.lists(st.sampled_from(targets), min_size=1, max_size=8), "steps")
    for target in steps:
        requests = data.draw(checked.strategy(("messages", target), message_requests))
        outcome = call(checked, target, requests)
        event(f"{target.method.name} status {outcome.code.name}")
        check_outcome(target, requests, outcome)


def _authorization(live: Live) -> st.SearchStrategy[str | None]:
    """The value of an ``authorization`` header: none, a real token of any role (with the
    scheme in any case, padded or not, or without it), or anything printable."""
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    # By role: the tokens themselves are random, and examples must not depend on them.
    tokens = st.sampled_from(sorted(live.cluster.tokens)).map(live.cluster.tokens.__getitem__)
    return st.one_of(
        st.none(),
        tokens.map(lambda t: f"Bearer {t}"),
        st.builds(
            lambda scheme, pad, t: f"{scheme}{pad}{t}{pad}",
            st.sampled_from(["bearer ", "BEARER ", "Bearer", "Basic ", ""]),
            st.sampled_from(["", " "]),
            tokens,
        ),
        tokens.map(lambda t: f"Bearer {t[:-1]}"),
        printable,
        printable.map(lambda v: "Bearer " + v),
        st.just("Bearer " + "x" * 10_000),  # over gRPC's default metadata size limit
    )


def _role_of(live: Live, server: str, authorization: str | None) -> str | None:
    """The role a server must grant: ``Authorization: Bearer <token>`` (the scheme in any
    case, blanks around the token ignored) with a token it knows (agents know only the node
    token)."""
    if authorization is None or authorization[:7].lower() != "bearer ":
        return None
    presented = authorization[7:].strip()
    roles = ("client", "admin", "node") if server == COORDINATOR else ("node",)
    return next((r for r in roles if live.cluster.tokens.get(r) == presented), None)


@pytest.fixture
def checked_auth(live_auth: Live) -> Iterator[Live]:
    check_cluster(live_auth)
    yield live_auth
    check_cluster(live_auth)


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_auth(checked_auth: Live, data: st.DataObject) -> None:
    """Every method with every kind of credential, on a cluster that requires tokens: the
    role policy holds (health checks open, no token or an unknown one UNAUTHENTICATED, a
    role not allowed PERMISSION_DENIED) and nothing else breaks."""
    live = checked_auth
    target = data.draw(st.sampled_from(TARGETS), "target")
    authorization = data.draw(_authorization(live), "authorization")
    extra = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["x-fuzz", "user-agent-x", "x-fuzz-bin"]),
                st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
            ),
            max_size=2,
        ),
        "extra metadata",
    )
    requests = data.draw(live.strategy(("messages", target), message_requests), "requests")
    metadata: Metadata = tuple(
        (key, value.encode() if key.endswith("-bin") else value) for key, value in extra
    )
    if authorization is not None:
        metadata = (("authorization", authorization), *metadata)
    outcome = call(live, target, requests, metadata=metadata)
    event(f"status {outcome.code.name}")
    check_outcome(target, requests, outcome)
    role = _role_of(live, target.server, authorization)
    denied = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    what = f"{target} with authorization {authorization!r:.80}"
    too_big = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL}
    if len(authorization or "") > 8000 and outcome.code in too_big:
        pass  # over gRPC's metadata size limit (a soft one: not always): refused by gRPC
    elif outcome.code in too_big and "larger than max" in outcome.details:
        pass  # over the server's message size limit: refused by gRPC before any handler
    elif target.path.startswith("/grpc.health.v1.Health/"):
        assert outcome.code not in denied, f"{what}: health checks must stay open"
    elif role is None:
        assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, f"{what}: {outcome.code}"
    elif role not in allowed_roles(target.path):
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, f"{what}: {outcome.code}"
    else:
        assert outcome.code not in denied, f"{what} ({role}): {outcome.code} {outcome.details}"


def allowed_roles(path: str) -> set[str]:
    """Who may call what (docs/security.md)."""
    if path.startswith("/omni.v1.Registry/") or path.startswith("/omni.v1.NodeAgent/"):
        return {"node"}
    if path == "/omni.v1.Coordinator/DrainNode":
        return {"admin"}
    return {"client", "admin"}


@FUZZ_SETTINGS
@given(
    request_id=st.sampled_from(REQUEST_IDS) | st.text(max_size=40),
    messages=st.integers(0, 3),
    on_agent=st.booleans(),
)
def test_a_cancelled_request_does_not_affect_a_later_one_with_its_id(
    checked: Live, request_id: str, messages: int, on_agent: bool
) -> None:
    """A client may retry with the request id of a call it cancelled (or that timed out),
    through the coordinator or on an agent directly."""
    live = checked
    request = generate_pb2.GenerateRequest(request_id=request_id, prompt="cancelled")
    request.sampling.max_tokens = 64
    stream: Any
    if on_agent:
        first = node_agent_pb2.AgentRequest(generate=request).SerializeToString()
        stream = live.channel(AGENT).stream_stream("/omni.v1.NodeAgent/Generate", None, None)(
            iter([first]), timeout=CALL_TIMEOUT_S, metadata=live.metadata("node")
        )
    else:
        stream = live.channel(COORDINATOR).unary_stream(
            "/omni.v1.Coordinator/Generate", None, None
        )(request.SerializeToString(), timeout=CALL_TIMEOUT_S, metadata=live.metadata("client"))
    if messages:
        for index, _ in enumerate(stream):
            if index + 1 >= messages:
                break
    stream.cancel()
    wait_idle(live)
    normal_generate(live, request_id, agent=REAL_NODES[0] if on_agent else "")


@pytest.mark.parametrize("server", [COORDINATOR, AGENT])
def test_undecodable_request_is_invalid_argument(live: Live, server: str) -> None:
    for target in TARGETS:
        first = target.method.input_type.fields_by_number.get(1)
        if target.server != server or first is None or first.type != FieldDescriptor.TYPE_STRING:
            continue
        # Field 1 is a string: these bytes make it invalid UTF-8, which cannot parse.
        outcome = call(live, target, [b"\x0a\x02\xff\xfe"])
        assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (target.path, outcome)
        assert "does not parse" in outcome.details
