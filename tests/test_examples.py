"""Clients and tools outside Python: the Node.js example against a live cluster, buf lint."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from node_agent.engines.sim import simulate
from omni_rpc.launchers.local import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
NODE_EXAMPLE = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's npm dependencies (grpc-js, proto-loader, buf), installed from the registry."""
    folder = tmp_path_factory.mktemp("npm")
    shutil.copy(NODE_EXAMPLE / "package.json", folder / "package.json")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "node_modules"


def test_node_client_streams_and_reads_stats(
    make_cluster: Callable[..., LocalCluster], node_modules: Path
) -> None:
    cluster = make_cluster(2)
    prompt = "Hello from Node.js"
    done = subprocess.run(
        ["node", str(NODE_EXAMPLE / "client.js"), cluster.coordinator_address, prompt, "8"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == simulate(prompt, max_tokens=8).text
    assert "finish_reason=length" in lines[1] and "completion_tokens=8" in lines[1]
    assert "num_nodes=2" in lines[2] and "node-0,node-1" in lines[2]


def test_node_client_reports_errors(
    make_cluster: Callable[..., LocalCluster], node_modules: Path
) -> None:
    cluster = make_cluster(1)
    done = subprocess.run(
        ["node", str(NODE_EXAMPLE / "client.js"), cluster.coordinator_address, "", "8"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "prompt" in done.stderr


def test_buf_lint_is_clean(node_modules: Path) -> None:
    done = subprocess.run(
        [str(node_modules / ".bin" / "buf"), "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
