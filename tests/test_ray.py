"""Agents placed by Ray: a real local Ray instance (``ray start --head``) with logical GPUs."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from omni_rpc import DistributedOrchestrator, HealthMonitor
from omni_rpc.launchers.gpus import PlacementError
from omni_rpc.sdk.client import CoordinatorClient
from tests.conftest import wait_until
from tests.test_cli import omni, omni_up_running, wait_healthy_nodes

ray = pytest.importorskip("ray")

LOGICAL_GPUS = 16
# The "Multi-Node Cluster" example of the orchestrator's documentation, verbatim.
MULTI_NODE_EXAMPLE = """# Ray cluster across multiple machines
orchestrator = DistributedOrchestrator(
    model="Qwen/Qwen2.5-Omni-7B",
    num_nodes=16,
    ray_address="ray://head-node:10001"
)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LOCAL_RAY_SCRIPT = """
import asyncio
import ray
from omni_rpc import DistributedOrchestrator

# The documented "Single Machine" form: ray_address=None is a local Ray instance (CPU-only
# agents here, where there is no GPU).
orchestrator = DistributedOrchestrator(num_nodes=2, ray_address=None, ray_resources={"CPU": 0.5})
orchestrator.wait_ready()
results = asyncio.run(orchestrator.generate(["a", "b", "c", "d"], max_tokens=4))
stats = orchestrator.get_stats()
print("SERVED_BY", sorted({r.node_id for r in results}))
print("LAUNCHERS", sorted({n["launcher"] for n in stats["health_stats"].values()}))
orchestrator.close()
print("RAY_LEFT_RUNNING", ray.is_initialized())
"""


def test_explicit_ray_address_none_starts_a_local_ray_instance(tmp_path: Path) -> None:
    """Runs before the module's Ray head exists: the instance is the orchestrator's own."""
    script = tmp_path / "local_ray.py"
    script.write_text(LOCAL_RAY_SCRIPT)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SERVED_BY ['ray-node-0', 'ray-node-1']" in done.stdout
    assert "LAUNCHERS ['ray']" in done.stdout
    assert "RAY_LEFT_RUNNING False" in done.stdout


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster of one machine with 16 logical GPUs; the test process is a driver."""
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable))
    assert ray_cli, "the ray CLI is installed with the ray extra"
    address = f"127.0.0.1:{_free_port()}"
    # Token auth off explicitly: Ray 2.60 turns it on when it finds ~/.ray/auth_token (which
    # a local ray.init() leaves behind), and the head and this driver must agree.
    settings = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        subprocess.run(
            [
                ray_cli,
                "start",
                "--head",
                f"--port={address.rsplit(':', 1)[1]}",
                f"--num-gpus={LOGICAL_GPUS}",
                f"--num-cpus={2 * LOGICAL_GPUS}",
                "--object-store-memory=100000000",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={tmp_path_factory.mktemp('ray')}",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        ray.init(address=address, namespace="omni-rpc-tests", log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _gpus_free() -> float:
    return float(ray.available_resources().get("GPU", 0.0))


def _wait_all_gpus_free() -> None:
    wait_until(lambda: _gpus_free() == LOGICAL_GPUS, 60, "every GPU back in the Ray cluster")


def test_ray_places_one_agent_per_gpu_and_fails_over(ray_head: str) -> None:
    orchestrator = DistributedOrchestrator(
        num_nodes=4,
        ray_address=ray_head,
        health_check_interval=0.5,
        max_retries=3,
        agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "10"],
    )
    try:
        orchestrator.wait_ready(60)
        assert _gpus_free() == LOGICAL_GPUS - 4  # one bundle per agent, reserved
        stats = orchestrator.get_stats()
        nodes = stats["health_stats"]
        assert sorted(stats["healthy_nodes"]) == [f"ray-node-{i}" for i in range(4)]
        assert {n["launcher"] for n in nodes.values()} == {"ray"}
        devices = [n["visible_devices"] for n in nodes.values()]
        assert len(set(devices)) == 4 and all(d.isdigit() for d in devices), devices
        assert {n["gpu"] for n in nodes.values()} == {int(d) for d in devices}
        assert all(n["placement_labels"]["ray_node_id"] for n in nodes.values())

        async def monitor_stats() -> dict[str, Any]:
            monitor = HealthMonitor.remote()
            return dict(await monitor.get_health_stats.remote())

        assert sorted(asyncio.run(monitor_stats())) == sorted(nodes)

        # Kill one actor's process while it streams: its calls fail over, nothing is lost.
        victim = "ray-node-1"
        pid = int(nodes[victim]["placement_labels"]["pid"])

        prompts = [f"prompt {i}" for i in range(16)]
        tokens_before = nodes[victim]["load"]["generated_tokens"]

        def victim_streaming() -> bool:
            node = orchestrator.get_stats()["health_stats"][victim]
            return bool(node["in_flight"] > 0 and node["load"]["generated_tokens"] > tokens_before)

        async def traffic() -> list[Any]:
            async def killer() -> None:
                await asyncio.to_thread(wait_until, victim_streaming, 30, f"{victim} streaming")
                os.kill(pid, signal.SIGKILL)

            results, _ = await asyncio.gather(
                orchestrator.generate(prompts, max_tokens=150), killer()
            )
            return list(results)

        results = asyncio.run(traffic())
        after = orchestrator.get_stats()
        assert after["retries_total"] >= 1 and after["resumes_total"] >= 1
        assert any(victim in r.nodes and r.node_id != victim for r in results)

        # Ray restarts the actor (a new process) and the node re-joins as healthy.
        def back() -> bool:
            node = orchestrator.get_stats()["health_stats"][victim]
            return bool(node["state"] == "healthy" and node["placement_labels"]["pid"] != str(pid))

        wait_until(back, 90, f"{victim} restarted by Ray and healthy again")
        # Resumed streams equal undisturbed ones: no token lost or repeated.
        again = asyncio.run(orchestrator.generate(prompts, max_tokens=150))
        assert [r.token_ids for r in results] == [r.token_ids for r in again]
        assert all(len(r.token_ids) == 150 for r in results)
    finally:
        orchestrator.close()
    _wait_all_gpus_free()  # close() removed the actors and the placement group


def test_ray_refuses_more_nodes_than_gpus_and_leaves_nothing(ray_head: str) -> None:
    _wait_all_gpus_free()
    started = time.monotonic()
    with pytest.raises(PlacementError, match=rf"{LOGICAL_GPUS} GPU in total.*17 nodes need 17"):
        DistributedOrchestrator(num_nodes=LOGICAL_GPUS + 1, ray_address=ray_head)
    assert time.monotonic() - started < 30
    assert _gpus_free() == LOGICAL_GPUS
    placement_groups = ray.util.placement_group_table()
    assert all(pg["state"] == "REMOVED" for pg in placement_groups.values())


def test_documented_multi_node_example_runs_with_only_the_address_changed(
    ray_head: str, tmp_path: Path
) -> None:
    """The documented "Multi-Node Cluster" snippet, its address replaced by the local instance."""
    code = MULTI_NODE_EXAMPLE
    assert 'ray_address="ray://head-node:10001"' in code
    code = code.replace("ray://head-node:10001", ray_head)
    # Simulated agents under the example's model name: only when asked for (engine="sim");
    # by default a real model's name runs vLLM.
    code = code.replace("num_nodes=16,", 'num_nodes=16,\n    engine="sim",')
    assert 'engine="sim"' in code
    script = tmp_path / "multi_node.py"
    script.write_text(
        "from omni_rpc import DistributedOrchestrator\n"
        + code
        + textwrap.dedent(
            """
            import asyncio
            orchestrator.wait_ready()
            results = asyncio.run(orchestrator.generate([f"p{i}" for i in range(32)]))
            stats = orchestrator.get_stats()
            print("NODES", stats["num_nodes"], len(stats["healthy_nodes"]))
            print("SERVED_BY", len({r.node_id for r in results}))
            print("LAUNCHERS", sorted({n["launcher"] for n in stats["health_stats"].values()}))
            orchestrator.close()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NODES 16 16" in done.stdout
    assert "LAUNCHERS ['ray']" in done.stdout
    served_by = int(done.stdout.split("SERVED_BY ")[1].split()[0])
    assert served_by == 16  # round robin over 16 nodes, 32 prompts
    _wait_all_gpus_free()


def test_omni_up_places_cpu_only_agents_with_ray(ray_head: str, tmp_path: Path) -> None:
    """`omni up --ray-address` with CPU-only resources per simulated agent; Ctrl-C cleans up.

    The coordinator then listens beyond loopback, so omni up makes tokens (auth on)."""
    address = f"127.0.0.1:{_free_port()}"
    log_dir = tmp_path / "logs"
    token = ["--token-file", str(log_dir / "admin.token")]
    cpus_before = float(ray.available_resources().get("CPU", 0.0))
    with omni_up_running(
        "--nodes",
        "3",
        "--ray-address",
        ray_head,
        "--ray-resources",
        '{"CPU": 1}',
        "--listen",
        address,
        "--log-dir",
        str(log_dir),
    ) as process:
        nodes = wait_healthy_nodes(process, address, 3, 90, *token)
        assert {n["launcher"] for n in nodes} == {"ray"}
        assert {n["visible_devices"] for n in nodes} == {""}  # no GPU asked, none visible
        assert _gpus_free() == LOGICAL_GPUS
        status = omni("status", "--coordinator", address, *token)
        assert status.returncode == 0 and "ray-node-2" in status.stdout
        assert status.stdout.count("placed by ray on ") == 3
        refused = omni("status", "--coordinator", address)
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
    wait_until(
        lambda: float(ray.available_resources().get("CPU", 0.0)) == cpus_before,
        60,
        "the agents' CPUs released",
    )


def test_the_sdk_starts_two_coordinators_for_ray_agents(ray_head: str) -> None:
    """num_coordinators=2: every Ray agent joins both coordinators, and the orchestrator's
    calls go on through one when the other is killed."""
    orchestrator = DistributedOrchestrator(
        num_nodes=2,
        ray_address=ray_head,
        ray_resources={"CPU": 1},
        num_coordinators=2,
        health_check_interval=0.5,
        agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "5"],
    )
    try:
        orchestrator.wait_ready(90)
        cluster = orchestrator.cluster
        assert cluster is not None and len(cluster.coordinator_addresses) == 2
        for address in cluster.coordinator_addresses:

            def both_joined(at: str = address) -> bool:
                client = CoordinatorClient(at, security=orchestrator.security)
                try:
                    return sorted(client.stats().healthy_nodes) == ["ray-node-0", "ray-node-1"]
                finally:
                    client.close()

            wait_until(both_joined, 60, f"both Ray agents healthy at {address}")
        prompts = [f"two coordinators {i}" for i in range(8)]
        before = asyncio.run(orchestrator.generate(prompts, max_tokens=20))
        cluster.kill_coordinator(0)
        after = asyncio.run(orchestrator.generate(prompts, max_tokens=20))
        assert [r.token_ids for r in after] == [r.token_ids for r in before]
    finally:
        orchestrator.close()


def test_ray_actor_runs_a_real_vllm_engine(ray_head: str) -> None:
    """The engine users already run, placed by Ray: vLLM (CPU build here) inside the actor."""
    from node_agent.models import prepare
    from tests.test_vllm import ENGINE_FLAGS, MODEL

    prepare(MODEL)
    with DistributedOrchestrator(
        model=MODEL,
        engine="vllm",
        num_nodes=1,
        ray_address=ray_head,
        ray_resources={"CPU": 1},  # no GPU here: the CPU build of vLLM
        agent_args=ENGINE_FLAGS,
    ) as orchestrator:
        results = asyncio.run(
            orchestrator.generate(["The capital of France is"], max_tokens=3, temperature=0.0)
        )
        assert results[0].text.startswith(" Paris")
        node = orchestrator.get_stats()["health_stats"]["ray-node-0"]
        assert (node["launcher"], node["engine"]) == ("ray", "vllm")
    wait_until(
        lambda: float(ray.available_resources().get("CPU", 0.0)) == 2 * LOGICAL_GPUS,
        60,
        "the actor's CPU released",
    )
