"""A Go client compiled from protos/: protoc, protoc-gen-go and protoc-gen-go-grpc generate the
omni.v1 Go package, a small main imports it, and the built binary streams a generation from a
live cluster, lists its nodes and sees a refused request's status.

The toolchain comes from Debian's packages (`scripts/install_go.sh`, which `make test` runs)
and the build is offline, in GOPATH mode against the Go libraries those packages put under
/usr/share/gocode. Without the toolchain the test skips and says what is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from node_agent.engines.sim import simulate
from omni_rpc.launchers.local import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# The go_package every omni.v1 file declares (the part before ";omniv1").
GO_PACKAGE = "github.com/omni-rpc/omni-rpc/gen/go/omni/v1"
DEBIAN_GOPATH = Path("/usr/share/gocode")
TOOLS = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
GO_LIBRARIES = (
    "google.golang.org/grpc",
    "google.golang.org/protobuf",
    "github.com/golang/protobuf",
)

MAIN_GO = """\
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	omniv1 "%(package)s"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "%%s: %%v\\n", what, err)
	os.Exit(1)
}

// generate streams one generation and returns its text and last message.
func generate(
	ctx context.Context, client omniv1.CoordinatorClient, prompt string, maxTokens int32,
) (string, *omniv1.GenerateResponse, error) {
	stream, err := client.Generate(ctx, &omniv1.GenerateRequest{
		Prompt:   prompt,
		Sampling: &omniv1.SamplingParams{MaxTokens: proto.Int32(maxTokens)},
	})
	if err != nil {
		return "", nil, err
	}
	var text strings.Builder
	var last *omniv1.GenerateResponse
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			return text.String(), last, nil
		}
		if err != nil {
			return "", nil, err
		}
		text.WriteString(msg.GetText())
		last = msg
	}
}

func main() {
	address, prompt := os.Args[1], os.Args[2]
	maxTokens, err := strconv.Atoi(os.Args[3])
	if err != nil {
		fail("max_tokens", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, address, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail("dial", err)
	}
	defer conn.Close()
	client := omniv1.NewCoordinatorClient(conn)

	text, last, err := generate(ctx, client, prompt, int32(maxTokens))
	if err != nil {
		fail("generate", err)
	}
	quoted, _ := json.Marshal(text)
	fmt.Printf("text=%%s\\n", quoted)
	fmt.Printf("finish_reason=%%s completion_tokens=%%d node_id=%%s attempt=%%d\\n",
		last.GetFinishReason(), last.GetUsage().GetCompletionTokens(), last.GetNodeId(),
		last.GetAttempt())

	// A node can turn healthy before the coordinator has its first load report: wait for it.
	var nodes *omniv1.ListNodesResponse
	for {
		nodes, err = client.ListNodes(ctx, &omniv1.ListNodesRequest{})
		if err != nil {
			fail("list nodes", err)
		}
		loaded := true
		for _, node := range nodes.GetNodes() {
			loaded = loaded && node.GetLoad().GetNodeId() != ""
		}
		if loaded {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, node := range nodes.GetNodes() {
		// placement and load are messages of node.proto.
		fmt.Printf("node %%s %%s launcher=%%s load_node_id=%%s\\n",
			node.GetNodeId(), node.GetState(), node.GetPlacement().GetLauncher(),
			node.GetLoad().GetNodeId())
	}

	_, _, err = generate(ctx, client, "", int32(maxTokens))
	fmt.Printf("empty prompt: %%s\\n", status.Code(err))
}
"""


def _toolchain() -> dict[str, str]:
    """The environment for an offline GOPATH-mode build; skips when a piece is missing."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    missing += [
        f"{DEBIAN_GOPATH}/src/{library}"
        for library in GO_LIBRARIES
        if not (DEBIAN_GOPATH / "src" / library).is_dir()
    ]
    if missing:
        pytest.skip(
            "Go toolchain absent (" + ", ".join(missing) + "): scripts/install_go.sh installs "
            "it from Debian's packages when run as root"
        )
    return {
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
    }


def _go_build(tmp_path: Path) -> Path:
    """Generate the omni.v1 Go package from protos/ and build a client that imports it."""
    go_env = _toolchain()
    gopath = tmp_path / "gopath"
    src = gopath / "src"
    src.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "omni" / "v1").glob("*.proto"))
    done = subprocess.run(
        ["protoc", f"-I{PROTOS}", f"--go_out={src}", f"--go-grpc_out={src}", *protos],
        cwd=PROTOS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    generated = sorted(p.name for p in (src / GO_PACKAGE).iterdir())
    assert {"coordinator.pb.go", "coordinator_grpc.pb.go", "node.pb.go"} <= set(generated)

    main = src / "omniclient" / "main.go"
    main.parent.mkdir()
    main.write_text(MAIN_GO % {"package": GO_PACKAGE})
    binary = tmp_path / "omniclient"
    env = {**os.environ, **go_env, "GOPATH": f"{gopath}{os.pathsep}{DEBIAN_GOPATH}"}
    if not (env.get("GOCACHE") or env.get("XDG_CACHE_HOME") or env.get("HOME")):
        env["GOCACHE"] = str(tmp_path / "gocache")
    done = subprocess.run(
        ["go", "build", "-o", str(binary), "omniclient"],
        cwd=gopath,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return binary


def test_go_client_streams_lists_nodes_and_sees_status(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    binary = _go_build(tmp_path)
    cluster = make_cluster(2)
    prompt = "Hello from Go"
    done = subprocess.run(
        [str(binary), cluster.coordinator_address, prompt, "8"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    expected = simulate(prompt, max_tokens=8).text
    assert lines[0].startswith("text=") and json.loads(lines[0][5:]) == expected, lines[0]
    summary = re.fullmatch(
        r"finish_reason=length completion_tokens=8 node_id=(node-[01]) attempt=1", lines[1]
    )
    assert summary, lines[1]
    nodes = sorted(line for line in lines if line.startswith("node "))
    assert nodes == [
        f"node {node_id} NODE_STATE_HEALTHY launcher=local load_node_id={node_id}"
        for node_id in ("node-0", "node-1")
    ], done.stdout
    assert lines[-1] == "empty prompt: InvalidArgument"
