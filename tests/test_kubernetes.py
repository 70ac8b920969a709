"""deploy/kubernetes: the manifests are valid Kubernetes and agree with the code they run.

Every manifest is validated offline, strictly (unknown fields fail), against the Kubernetes
schemas that kubernetes-validate ships; the RayCluster (a KubeRay CRD, not in those schemas)
gets its own structural check with its pod templates validated as core PodTemplates. Then the
workloads are read as the kubelet would and checked against the servers: every OMNI_* variable
is an option of the server it configures and parses to a valid value, the probes ask the health
services the servers register on the ports they listen on, and the GPU DaemonSets give every
GPU node exactly one agent layout. Two coordinators run at once, each with its own registry:
a rollout or a drain never stops both, the scheduler is asked to put them on different nodes,
clients keep the Service omni-coordinator, and agents advertise their pod IP and join every
coordinator through the headless Service omni-coordinator-peers; each of those checks is also
shown to fail on a broken copy. A last test starts a coordinator and an agent with the
manifests' environment and runs the probes against them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.main import SERVICES as COORDINATOR_SERVICES
from coordinator.main import build_parser as coordinator_parser
from coordinator.strategies import STRATEGIES
from node_agent.main import K8S_LABEL_ENV
from node_agent.main import build_parser as agent_parser
from omni_rpc import config, security, settings
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.targets import CoordinatorTarget, parse_targets

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# The newest schemas kubernetes-validate ships (1.37.0); a version it lacks fails loudly.
K8S_VERSION = "1.37.0"
# Kinds defined by CRDs, absent from Kubernetes' schemas, each with its own check below.
CUSTOM_KINDS = {("ray.io/v1", "RayCluster")}
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet"}
# Variables other than OMNI_* a container may set: the downward API values the agent reads
# (and POD_IP for --advertise), and the hub token for gated models.
OTHER_ENV = {*K8S_LABEL_ENV.values(), "POD_IP", "HF_TOKEN"}
DOWNWARD_API = {
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "NODE_NAME": "spec.nodeName",
    "POD_IP": "status.podIP",
}
# What the kubelet would put in for each downward API field, for parsing the configuration.
POD_VALUES = {
    "POD_NAME": "omni-agent-x7k2p",
    "POD_NAMESPACE": "omni-rpc",
    "NODE_NAME": "gpu-node-1",
    "POD_IP": "10.1.2.3",
    "HF_TOKEN": "hf_dummy",
}
Doc = dict[str, Any]


# --- reading the manifests ---------------------------------------------------------------


def manifest_files(root: Path = DEPLOY) -> list[Path]:
    files = [*root.rglob("*.yaml"), *root.rglob("*.yml")]
    return sorted(f for f in files if f.name != "kustomization.yaml")


def load(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    return docs


@functools.cache
def all_docs() -> list[tuple[Path, Doc]]:
    """Every document, read once (tests that break one work on a deep copy)."""
    return [(path, doc) for path in manifest_files() for doc in load(path)]


def label(path: Path, doc: Doc) -> str:
    return f"{path.relative_to(DEPLOY)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- validation --------------------------------------------------------------------------


def validate_core(doc: Doc) -> str:
    """Strict schema validation; returns the schema version used. Raises on any problem,
    including a kind or apiVersion the schemas do not know."""
    version: str = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return version


def validate_pod_template(template: Doc, where: str) -> None:
    wrapped = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "check"},
        "template": template,
    }
    try:
        validate_core(wrapped)
    except Exception as exc:
        raise AssertionError(f"{where}: {exc}") from exc


def require_keys(value: Any, allowed: set[str], required: set[str], where: str) -> None:
    assert isinstance(value, dict), f"{where}: expected a mapping"
    unknown = set(value) - allowed
    assert not unknown, f"{where}: unknown fields {sorted(unknown)} (known: {sorted(allowed)})"
    missing = required - set(value)
    assert not missing, f"{where}: missing {sorted(missing)}"


# Fields of KubeRay's ray.io/v1 RayClusterSpec, HeadGroupSpec and WorkerGroupSpec.
RAY_SPEC = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
}
RAY_HEAD = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
RAY_WORKER = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}
RAY_AUTOSCALER = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
}


def validate_raycluster(doc: Doc) -> None:
    where = f"RayCluster/{doc.get('metadata', {}).get('name')}"
    require_keys(doc, {"apiVersion", "kind", "metadata", "spec"}, {"metadata", "spec"}, where)
    validate_core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    spec = doc["spec"]
    require_keys(spec, RAY_SPEC, {"headGroupSpec"}, f"{where}.spec")
    if "autoscalerOptions" in spec:
        require_keys(spec["autoscalerOptions"], RAY_AUTOSCALER, set(), f"{where} autoscaler")
    head = spec["headGroupSpec"]
    require_keys(head, RAY_HEAD, {"template"}, f"{where} head")
    groups = [(f"{where} head", head)]
    for i, worker in enumerate(spec.get("workerGroupSpecs", [])):
        require_keys(worker, RAY_WORKER, {"groupName", "template"}, f"{where} worker {i}")
        replicas = [worker.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        assert all(isinstance(r, int) for r in replicas), f"{where} worker {i}: replicas"
        assert replicas == sorted(replicas), f"{where} worker {i}: need min <= replicas <= max"
        groups.append((f"{where} worker {i}", worker))
    for name, group in groups:
        params = group.get("rayStartParams", {})
        assert isinstance(params, dict), f"{name}: rayStartParams must be a mapping"
        assert all(isinstance(v, str) for v in params.values()), (
            f"{name}: rayStartParams values must be strings"
        )
        validate_pod_template(group["template"], name)


def validate(doc: Doc) -> None:
    if (doc.get("apiVersion"), doc.get("kind")) in CUSTOM_KINDS:
        validate_raycluster(doc)
    else:
        assert validate_core(doc) == "1.37"


def test_schema_version_is_current() -> None:
    from kubernetes_validate.utils import (  # type: ignore[import-untyped,unused-ignore]
        latest_version,
    )

    assert latest_version() == K8S_VERSION, "pin the newest schemas kubernetes-validate ships"


def test_there_are_manifests() -> None:
    kinds = {doc["kind"] for _, doc in all_docs()}
    assert {"Deployment", "Service", "PodDisruptionBudget", "DaemonSet", "RayCluster"} <= kinds


@pytest.mark.parametrize(
    "path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)) if p else ""
)
def test_manifest_validates_strictly(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        validate(doc)


def broken(mutate: Callable[[Doc], None], kind: str) -> Doc:
    doc = next(d for _, d in all_docs() if d["kind"] == kind)
    copied = copy.deepcopy(doc)
    mutate(copied)
    return copied


def first_container(doc: Doc) -> Doc:
    container: Doc = doc["spec"]["template"]["spec"]["containers"][0]
    return container


def ray_worker_container(doc: Doc) -> Doc:
    container: Doc = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    return container


BREAKAGES: dict[str, tuple[str, Callable[[Doc], None]]] = {
    "misspelt container field": (
        "Deployment",
        lambda d: first_container(d).update(livenesProbe=first_container(d)["livenessProbe"]),
    ),
    "misspelt grpc probe field": (
        "DaemonSet",
        lambda d: first_container(d)["readinessProbe"]["grpc"].update(servce="x"),
    ),
    "probe port as text": (
        "Deployment",
        lambda d: first_container(d)["livenessProbe"]["grpc"].update(port="grpc"),
    ),
    "unknown apiVersion": ("Deployment", lambda d: d.update(apiVersion="apps/v2")),
    "replicas as text": ("Deployment", lambda d: d["spec"].update(replicas="one")),
    "service without ports as a list": (
        "Service",
        lambda d: d["spec"].update(ports=d["spec"]["ports"][0]),
    ),
    "ray: unknown spec field": (
        "RayCluster",
        lambda d: d["spec"].update(workerGroupSpec=d["spec"]["workerGroupSpecs"]),
    ),
    "ray: misspelt container field in a worker": (
        "RayCluster",
        lambda d: ray_worker_container(d).update(resource={}),
    ),
    "ray: min above max": (
        "RayCluster",
        lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=9),
    ),
}


@pytest.mark.parametrize("what", sorted(BREAKAGES))
def test_broken_manifest_is_rejected(what: str) -> None:
    kind, mutate = BREAKAGES[what]
    with pytest.raises(Exception):  # noqa: B017 - schema errors and our assertions alike
        validate(broken(mutate, kind))


def test_kustomization_lists_every_core_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    resources = set(kustomization["resources"])
    core = {
        str(path.relative_to(DEPLOY))
        for path in manifest_files()
        if all((d["apiVersion"], d["kind"]) not in CUSTOM_KINDS for d in load(path))
    }
    assert resources == core, "kustomization.yaml must list exactly the core manifests"
    namespaces = {d["metadata"]["name"] for _, d in all_docs() if d["kind"] == "Namespace"}
    assert namespaces == {kustomization["namespace"]}
    for _, doc in all_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == kustomization["namespace"], doc["kind"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_every_core_object() -> None:
    done = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    expected = [d for _, d in all_docs() if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]
    assert len(rendered) == len(expected)
    for doc in rendered:
        validate(doc)


# --- the workloads against the servers ---------------------------------------------------


def docs_of(kind: str) -> list[Doc]:
    return [d for _, d in all_docs() if d["kind"] == kind]


def config_map(name: str) -> dict[str, str]:
    found = [d for d in docs_of("ConfigMap") if d["metadata"]["name"] == name]
    assert len(found) == 1, f"ConfigMap {name} is not in deploy/kubernetes"
    data: dict[str, str] = found[0]["data"]
    return data


def workloads() -> list[Doc]:
    return [d for _, d in all_docs() if d["kind"] in WORKLOAD_KINDS]


def omni_containers() -> Iterator[tuple[Doc, Doc, str]]:
    """(workload, container, component) for every container running an omni server."""
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            command = container.get("command", [])
            if command[:1] == ["omni-coordinator"]:
                yield workload, container, "coordinator"
            elif command[:1] == ["omni-agent"]:
                yield workload, container, "agent"


def container_ids() -> list[str]:
    return [f"{w['metadata']['name']}/{c['name']}" for w, c, _ in omni_containers()]


def parser_for(component: str) -> argparse.ArgumentParser:
    return coordinator_parser() if component == "coordinator" else agent_parser()


def env_names(parser: argparse.ArgumentParser) -> set[str]:
    """The OMNI_* variables a server reads: one per option, plus OMNI_CONFIG."""
    dests = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    return {settings.env_name(d) for d in dests | {"config"}}


def container_env(container: Doc, where: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env, with
    $(VAR) expanded from variables defined before; downward API values from POD_VALUES."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"{where}: only configMapRef envFrom is expected"
        env.update(config_map(source["configMapRef"]["name"]))
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            value = str(item["value"])
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
                assert ref in env, f"{where}: {name} uses $({ref}), which is not defined before it"
                value = value.replace(f"$({ref})", env[ref])
            env[name] = value
        else:
            source = item["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                assert DOWNWARD_API.get(name) == path, f"{where}: {name} from {path}"
            env[name] = POD_VALUES[name]
    return env


def secret_files(workload: Doc, container: Doc) -> dict[str, tuple[str, str]]:
    """Files the container sees from Secret volumes: path -> (secret name, key)."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    files: dict[str, tuple[str, str]] = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert "subPath" not in mount, "a subPath mount is not updated when the Secret rotates"
        keys = [i["key"] for i in secret["items"]] if "items" in secret else list(security.ROLES)
        paths = [i["path"] for i in secret["items"]] if "items" in secret else keys
        for key, path in zip(keys, paths, strict=True):
            files[f"{mount['mountPath'].rstrip('/')}/{path}"] = (secret["secretName"], key)
    return files


def parsed(component: str, env: dict[str, str]) -> argparse.Namespace:
    """The server's options from this environment, exactly as it parses them at start-up."""
    parser = parser_for(component)
    try:
        args, sources = settings.parse(parser, component, argv=[], env=env)
    except SystemExit as exc:
        raise AssertionError(f"omni-{component} rejects this environment (exit {exc})") from exc
    for name in env:
        if name.startswith(settings.ENV_PREFIX):
            dest = name.removeprefix(settings.ENV_PREFIX).lower()
            assert sources.get(dest) == f"env {name}", f"{name} was not used"
    return args


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def ports_by_name(container: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


@pytest.mark.parametrize("index", range(len(container_ids())), ids=container_ids())
def test_environment_is_real_options(index: int) -> None:
    workload, container, component = list(omni_containers())[index]
    where = f"{workload['metadata']['name']}/{container['name']}"
    env = container_env(container, where)
    known = env_names(parser_for(component))
    for name in env:
        if name.startswith(settings.ENV_PREFIX):
            assert name in known, f"{where}: {name} is no option of omni-{component}"
        else:
            assert name in OTHER_ENV, f"{where}: unexpected variable {name}"
    args = parsed(component, env)
    # Token and certificate files are mounted from a Secret (never baked into the image).
    mounted = secret_files(workload, container)
    for name, value in env.items():
        if name.startswith(settings.ENV_PREFIX) and name.endswith("_FILE") and "TOKEN" in name:
            assert value in mounted, f"{where}: {name}={value} is in no Secret volume"
            role = name.removeprefix(settings.ENV_PREFIX).removesuffix("_TOKEN_FILE").lower()
            assert mounted[value][1] == role, f"{where}: {name} reads key {mounted[value][1]}"
    if args.auth == "required":
        outgoing = "OMNI_NODE_TOKEN_FILE"
        assert outgoing in env, f"{where}: auth is on, and it has no node token to present"
    if component == "coordinator":
        assert args.strategy in STRATEGIES
    else:
        assert args.launcher == "kubernetes"
        assert args.engine and args.model and args.coordinator
        for variable in K8S_LABEL_ENV.values():
            assert variable in env, f"{where}: the agent's placement label {variable} is unset"


@pytest.mark.parametrize("index", range(len(container_ids())), ids=container_ids())
def test_probes_and_ports_match_the_server(index: int) -> None:
    workload, container, component = list(omni_containers())[index]
    where = f"{workload['metadata']['name']}/{container['name']}"
    args = parsed(component, container_env(container, where))
    ports = ports_by_name(container)
    assert len(set(ports.values())) == len(ports), f"{where}: duplicate ports"
    host, _ = args.listen.rsplit(":", 1)
    assert host in ("0.0.0.0", "[::]"), f"{where}: listens on {host}, unreachable from outside"
    listen = port_of(args.listen)
    grpc_ports = [n for n, p in ports.items() if n.startswith("grpc") and p == listen]
    assert grpc_ports, f"{where}: no container port named grpc* for the listen port {listen}"
    service = (
        config.COORDINATOR_SERVICE if component == "coordinator" else config.NODE_AGENT_SERVICE
    )
    if component == "coordinator":
        assert service in COORDINATOR_SERVICES
    # The kubelet's gRPC probes carry no token and speak no TLS.
    assert args.health_auth == "open", f"{where}: probes would get UNAUTHENTICATED"
    assert not args.tls_cert, f"{where}: the kubelet's gRPC probes cannot speak TLS"
    expected = {"readinessProbe": service, "livenessProbe": "", "startupProbe": ""}
    for probe_name, health_service in expected.items():
        probe = container.get(probe_name)
        if probe is None:
            assert probe_name == "startupProbe", f"{where}: no {probe_name}"
            continue
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, where
        assert probe["grpc"]["port"] == listen, f"{where}: {probe_name} on another port"
        assert probe["grpc"].get("service", "") == health_service, f"{where}: {probe_name}"
    # Metrics: on, on a declared port named metrics*, and what the annotation says if any.
    assert args.metrics_port, f"{where}: OMNI_METRICS_PORT is not set"
    metrics = [n for n, p in ports.items() if n.startswith("metrics") and p == args.metrics_port]
    assert metrics, f"{where}: no container port named metrics* for {args.metrics_port}"
    pod = workload["spec"]["template"]
    annotations = pod["metadata"].get("annotations", {})
    containers = pod["spec"]["containers"]
    if annotations.get("prometheus.io/scrape") == "true":
        assert len(containers) == 1, f"{where}: one prometheus.io/port cannot cover the pod"
        assert annotations["prometheus.io/port"] == str(args.metrics_port)
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > args.shutdown_grace, f"{where}: killed before its shutdown grace is over"


def coordinator_service() -> tuple[Doc, Doc]:
    deployments = [d for d in docs_of("Deployment") if d["metadata"]["name"] == "omni-coordinator"]
    services = [d for d in docs_of("Service") if d["metadata"]["name"] == "omni-coordinator"]
    assert len(deployments) == 1 and len(services) == 1
    return deployments[0], services[0]


def agent_workloads() -> list[Doc]:
    return [
        w
        for w in workloads()
        if any(
            c.get("command", [])[:1] == ["omni-agent"]
            for c in w["spec"]["template"]["spec"]["containers"]
        )
    ]


# --- several coordinators -----------------------------------------------------------------
#
# Each coordinator keeps its own soft-state registry, filled by agents that join every
# coordinator pod they find behind the headless Service. The checks take the objects as
# arguments, so that test_coordinator_ha_regressions_are_caught can run them on broken copies.

PEERS_SERVICE = "omni-coordinator-peers"
CLUSTER_DOMAIN = "cluster.local"
SPREAD_KEY = "kubernetes.io/hostname"


def coordinator_objects() -> dict[str, Any]:
    """The objects that make up the coordinators and how agents find them, by role."""
    deployment, service = coordinator_service()
    peers = [d for d in docs_of("Service") if d["metadata"]["name"] == PEERS_SERVICE]
    assert len(peers) == 1, f"Service {PEERS_SERVICE} is not in deploy/kubernetes"
    budgets = docs_of("PodDisruptionBudget")
    assert len(budgets) == 1, "one PodDisruptionBudget, for the coordinators"
    return {
        "deployment": deployment,
        "service": service,
        "peers": peers[0],
        "budget": budgets[0],
        "agents": agent_workloads(),
    }


def coordinator_pod_labels(objects: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = objects["deployment"]["spec"]["template"]["metadata"]["labels"]
    return labels


def selects_exactly_the_coordinators(selector: dict[str, str], objects: dict[str, Any]) -> bool:
    """Whether a label selector takes every coordinator pod and nothing the Deployment would
    not count as its own (it is at least as narrow as the Deployment's selector)."""
    deployment_selector = objects["deployment"]["spec"]["selector"]["matchLabels"]
    return bool(selector) and (
        selector.items() <= coordinator_pod_labels(objects).items()
        and deployment_selector.items() <= selector.items()
    )


def check_replicas_and_rollout(objects: dict[str, Any]) -> None:
    spec = objects["deployment"]["spec"]
    assert spec["replicas"] == 2, "two coordinators, so that one may die"
    strategy = spec.get("strategy", {"type": "RollingUpdate"})
    assert strategy["type"] == "RollingUpdate", "Recreate takes every coordinator down at once"
    rolling = strategy.get("rollingUpdate", {})
    assert rolling.get("maxUnavailable") == 0, "a rollout must not stop a coordinator first"
    assert rolling.get("maxSurge") == 1, "a rollout starts one new coordinator at a time"
    # A new coordinator is counted available (and the next old one stopped) only once every
    # agent has re-resolved the headless Service (--coordinator-resolve-interval) and joined it.
    slowest = max(
        float(parsed("agent", container_env(c, w["metadata"]["name"])).coordinator_resolve_interval)
        for w in objects["agents"]
        for c in w["spec"]["template"]["spec"]["containers"]
    )
    assert spec.get("minReadySeconds", 0) > slowest, (
        f"minReadySeconds must exceed the agents' re-resolve interval ({slowest} s)"
    )


def check_spread(objects: dict[str, Any]) -> None:
    affinity = objects["deployment"]["spec"]["template"]["spec"].get("affinity", {})
    anti = affinity.get("podAntiAffinity", {})
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti, (
        "required anti-affinity leaves a one-node cluster with a single coordinator"
    )
    spreading = [
        term
        for term in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        if term["podAffinityTerm"]["topologyKey"] == SPREAD_KEY
        and set(term["podAffinityTerm"]) == {"topologyKey", "labelSelector"}  # own namespace
        and set(term["podAffinityTerm"]["labelSelector"]) == {"matchLabels"}
        and selects_exactly_the_coordinators(
            term["podAffinityTerm"]["labelSelector"]["matchLabels"], objects
        )
    ]
    assert spreading, f"no preferred anti-affinity of the coordinator pods on {SPREAD_KEY}"
    assert max(term["weight"] for term in spreading) == 100, "the strongest preference"


def check_budget(objects: dict[str, Any]) -> None:
    budget = objects["budget"]["spec"]
    assert selects_exactly_the_coordinators(budget["selector"].get("matchLabels", {}), objects), (
        "the budget does not select the coordinator pods"
    )
    assert set(budget["selector"]) == {"matchLabels"}
    assert budget.get("minAvailable") == 1, (
        "minAvailable: 1: drains evict one coordinator at a time, never the last"
    )
    assert "maxUnavailable" not in budget, "minAvailable and maxUnavailable exclude each other"
    assert budget["minAvailable"] < objects["deployment"]["spec"]["replicas"], (
        "minAvailable must leave one coordinator evictable, or drains block"
    )


def check_client_service(objects: dict[str, Any]) -> None:
    service = objects["service"]["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert service.get("clusterIP") != "None", "clients (HTTP, grpcurl) need the virtual IP"
    assert selects_exactly_the_coordinators(service["selector"], objects), "selects no pod"
    (container,) = objects["deployment"]["spec"]["template"]["spec"]["containers"]
    ports = ports_by_name(container)
    targets = {p["name"]: ports[p["targetPort"]] for p in service["ports"]}
    args = parsed("coordinator", container_env(container, "coordinator"))
    assert targets == {
        "grpc": port_of(args.listen),
        "http": port_of(args.http_listen),  # the OpenAI-compatible front door
        "metrics": args.metrics_port,
    }
    assert {p["name"]: p["port"] for p in service["ports"]} == {
        "grpc": 50051,
        "http": 8000,
        "metrics": 9090,
    }, "the ports clients and docs use"


def peers_grpc_port(objects: dict[str, Any]) -> int:
    (port,) = [p for p in objects["peers"]["spec"]["ports"] if p["name"] == "grpc"]
    number: int = port["port"]
    return number


def check_peers_service(objects: dict[str, Any]) -> None:
    peers = objects["peers"]["spec"]
    assert peers.get("clusterIP") == "None", f"{PEERS_SERVICE} must be headless"
    assert peers.get("type", "ClusterIP") == "ClusterIP"
    assert not peers.get("publishNotReadyAddresses", False), (
        "agents would join coordinators that are starting or draining"
    )
    assert selects_exactly_the_coordinators(peers["selector"], objects), "selects no coordinator"
    assert peers["selector"] == objects["service"]["spec"]["selector"], "the same pods"
    (container,) = objects["deployment"]["spec"]["template"]["spec"]["containers"]
    listen = port_of(parsed("coordinator", container_env(container, "coordinator")).listen)
    port = peers_grpc_port(objects)
    # No proxy in between: clients dial pod IP:port, so the port is the one the pods listen on.
    assert port == listen, f"{PEERS_SERVICE} port {port}, coordinators listen on {listen}"
    (spec,) = [p for p in peers["ports"] if p["name"] == "grpc"]
    target = spec.get("targetPort", port)
    assert ports_by_name(container).get(target, target) == listen


def check_agents_join_every_coordinator(objects: dict[str, Any]) -> None:
    namespace = objects["peers"]["metadata"]["namespace"]
    # Every address of the headless Service's fully qualified name (the name coordinator
    # certificates carry), on the port the coordinators listen on.
    expected = CoordinatorTarget(
        f"{PEERS_SERVICE}.{namespace}.svc.{CLUSTER_DOMAIN}",
        peers_grpc_port(objects),
        every_address=True,
    )
    count = 0
    for workload in objects["agents"]:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            count += 1
            where = f"{workload['metadata']['name']}/{container['name']}"
            args = parsed("agent", container_env(container, where))
            targets = parse_targets(args.coordinator)
            assert targets == [expected], (
                f"{where}: joins {args.coordinator}, not every coordinator ({expected})"
            )
            assert args.advertise == f"{POD_VALUES['POD_IP']}:{port_of(args.listen)}", where
    assert count >= 2


HA_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "replicas and rollout": check_replicas_and_rollout,
    "spread over nodes": check_spread,
    "disruption budget": check_budget,
    "client Service": check_client_service,
    "headless Service": check_peers_service,
    "agents join every coordinator": check_agents_join_every_coordinator,
}


@pytest.mark.parametrize("check", sorted(HA_CHECKS))
def test_coordinator_ha(check: str) -> None:
    HA_CHECKS[check](coordinator_objects())


def agent_env_item(objects: dict[str, Any], workload: int, index: int, name: str) -> Doc:
    """An env entry of the index-th container of one agent workload."""
    containers = objects["agents"][workload]["spec"]["template"]["spec"]["containers"]
    item: Doc = next(e for e in containers[index]["env"] if e["name"] == name)
    return item


def anti_affinity_term(objects: dict[str, Any]) -> Doc:
    spec = objects["deployment"]["spec"]["template"]["spec"]
    term: Doc = spec["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ][0]
    return term


def budget_as_max_unavailable(objects: dict[str, Any]) -> None:
    spec = objects["budget"]["spec"]
    spec.pop("minAvailable")
    spec["maxUnavailable"] = 1


def make_required(objects: dict[str, Any]) -> None:
    anti = objects["deployment"]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    terms = anti.pop("preferredDuringSchedulingIgnoredDuringExecution")
    anti["requiredDuringSchedulingIgnoredDuringExecution"] = [t["podAffinityTerm"] for t in terms]


HA_REGRESSIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "one replica": (
        "replicas and rollout",
        lambda o: o["deployment"]["spec"].update(replicas=1),
    ),
    "Recreate": (
        "replicas and rollout",
        lambda o: o["deployment"]["spec"].update(strategy={"type": "Recreate"}),
    ),
    "rollout stops an old pod first": (
        "replicas and rollout",
        lambda o: o["deployment"]["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=1),
    ),
    "new pod available before the agents found it": (
        "replicas and rollout",
        lambda o: o["deployment"]["spec"].update(minReadySeconds=5),
    ),
    "agents re-resolve more slowly than a new pod becomes available": (
        "replicas and rollout",
        lambda o: first_container(o["agents"][0])["env"].append(
            {"name": "OMNI_COORDINATOR_RESOLVE_INTERVAL", "value": "30"}
        ),
    ),
    "no anti-affinity": (
        "spread over nodes",
        lambda o: o["deployment"]["spec"]["template"]["spec"].pop("affinity"),
    ),
    "required anti-affinity": ("spread over nodes", make_required),
    "spread over zones only": (
        "spread over nodes",
        lambda o: anti_affinity_term(o)["podAffinityTerm"].update(
            topologyKey="topology.kubernetes.io/zone"
        ),
    ),
    "anti-affinity to other pods": (
        "spread over nodes",
        lambda o: anti_affinity_term(o)["podAffinityTerm"]["labelSelector"].update(
            matchLabels={"app.kubernetes.io/name": "omni-agent"}
        ),
    ),
    "budget as maxUnavailable": ("disruption budget", budget_as_max_unavailable),
    "budget blocks every eviction": (
        "disruption budget",
        lambda o: o["budget"]["spec"].update(minAvailable=2),
    ),
    "budget on other pods": (
        "disruption budget",
        lambda o: o["budget"]["spec"]["selector"].update(
            matchLabels={"app.kubernetes.io/name": "omni-agent"}
        ),
    ),
    "client Service made headless": (
        "client Service",
        lambda o: o["service"]["spec"].update(clusterIP="None"),
    ),
    "peers Service with a virtual IP": (
        "headless Service",
        lambda o: o["peers"]["spec"].pop("clusterIP"),
    ),
    "peers Service publishes unready pods": (
        "headless Service",
        lambda o: o["peers"]["spec"].update(publishNotReadyAddresses=True),
    ),
    "peers Service selects other pods": (
        "headless Service",
        lambda o: o["peers"]["spec"].update(selector={"app.kubernetes.io/name": "omni-agent"}),
    ),
    "peers Service on another port": (
        "headless Service",
        lambda o: o["peers"]["spec"]["ports"][0].update(port=50052),
    ),
    "agents join the client Service": (
        "agents join every coordinator",
        lambda o: agent_env_item(o, 0, 0, "OMNI_COORDINATOR").update(
            value="omni-coordinator.$(POD_NAMESPACE).svc:50051"
        ),
    ),
    "the last 4-GPU agent resolves without dns:///": (
        "agents join every coordinator",
        lambda o: agent_env_item(o, 1, -1, "OMNI_COORDINATOR").update(
            value="omni-coordinator-peers.$(POD_NAMESPACE).svc.cluster.local:50051"
        ),
    ),
}


@pytest.mark.parametrize("what", sorted(HA_REGRESSIONS))
def test_coordinator_ha_regressions_are_caught(what: str) -> None:
    check, mutate = HA_REGRESSIONS[what]
    objects = copy.deepcopy(coordinator_objects())
    mutate(objects)
    with pytest.raises(AssertionError):
        HA_CHECKS[check](objects)


def gpu_nodes_matched(workload: Doc, labels: dict[str, str]) -> bool:
    """Whether the workload's required node affinity and nodeSelector accept these labels."""
    spec = workload["spec"]["template"]["spec"]
    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
        return False
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]

    def matches(expression: Doc) -> bool:
        value, operator = labels.get(expression["key"]), expression["operator"]
        if operator == "In":
            return value in expression["values"]
        if operator == "NotIn":
            return value not in expression["values"]
        if operator == "Exists":
            return value is not None
        if operator == "DoesNotExist":
            return value is None
        raise AssertionError(f"operator {operator} not handled here")

    return any(
        all(matches(e) for e in term.get("matchExpressions", []))
        for term in required["nodeSelectorTerms"]
    )


def test_every_gpu_node_gets_one_agent_per_gpu() -> None:
    daemonsets = [w for w in agent_workloads() if w["kind"] == "DaemonSet"]
    assert len(daemonsets) >= 2, "a single-GPU DaemonSet and a multi-GPU variant"
    for workload in daemonsets:
        spec = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        tolerations = spec.get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations)
        assert not gpu_nodes_matched(workload, {}), f"{name} runs on nodes without a GPU"
        containers = spec["containers"]
        for container in containers:
            limits = container["resources"]["limits"]
            assert limits.get("nvidia.com/gpu") == 1, f"{name}/{container['name']}: one GPU"
        envs = [container_env(c, name) for c in containers]
        ids = [e["OMNI_NODE_ID"] for e in envs]
        assert len(set(ids)) == len(ids), f"{name}: node ids must differ within a pod"
        listens = [port_of(e["OMNI_LISTEN"]) for e in envs]
        assert len(set(listens)) == len(listens), f"{name}: agents share a port"
    # Every GPU node, whatever its GPU count (GPU feature discovery's label), and one without
    # the count label, is taken by exactly one of them, with one agent per GPU where the
    # layout is per GPU.
    for count in [None, *range(1, 17)]:
        labels = {"nvidia.com/gpu.present": "true"}
        if count is not None:
            labels["nvidia.com/gpu.count"] = str(count)
        takers = [w for w in daemonsets if gpu_nodes_matched(w, labels)]
        assert len(takers) == 1, f"{count} GPUs: taken by {[w['metadata']['name'] for w in takers]}"
        agents = len(takers[0]["spec"]["template"]["spec"]["containers"])
        assert agents == 1 or agents == count, f"{count} GPUs get {agents} agents"
    assert any(len(w["spec"]["template"]["spec"]["containers"]) > 1 for w in daemonsets)


def test_raycluster_matches_the_sdk_example_and_the_image() -> None:
    (cluster,) = docs_of("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = pyproject["project"]["optional-dependencies"]["ray"]
    assert pin == f"ray=={cluster['spec']['rayVersion']}", "rayVersion must be the image's Ray"
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert (workers["replicas"], workers["minReplicas"], workers["maxReplicas"]) == (4, 1, 8)
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    images = {c["image"].split(":")[0] for _, c, _ in omni_containers()}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {c["image"].split(":")[0] for c in [container, *head]} == images == {"omni-rpc"}
    env = {e["name"]: e for e in container.get("env", [])}
    for variable in K8S_LABEL_ENV.values():
        assert env[variable]["valueFrom"]["fieldRef"]["fieldPath"] == DOWNWARD_API[variable]


def test_dockerfile_matches_the_manifests() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for _, container, _ in omni_containers():
        assert container["command"][0] in pyproject["project"]["scripts"]
    assert re.search(r"^USER 10001", dockerfile, re.M)
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001, workload["metadata"]["name"]
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.*)$", dockerfile, re.M)[0].split()}
    declared = {
        p["containerPort"]
        for w in workloads()
        for c in w["spec"]["template"]["spec"]["containers"][:1]
        for p in c["ports"]
    }
    assert declared <= exposed
    # The build context (.dockerignore lets only listed paths through) holds what COPY needs,
    # and COPY brings in every package pyproject.toml installs.
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = set()
    for line in re.findall(r"^COPY (.*)$", dockerfile, re.M):
        sources = line.split()[:-1]
        assert set(sources) <= allowed, f"COPY {sources}: left out by .dockerignore"
        copied.update(sources)
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert pattern.rstrip("*") in copied, f"the image lacks {pattern}"


def test_broken_workloads_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above fail on the mistakes they are for."""
    (daemonset,) = [d for d in docs_of("DaemonSet") if d["metadata"]["name"] == "omni-agent"]
    container = first_container(daemonset)
    env = container_env(container, "agent")
    with pytest.raises(AssertionError, match="OMNI_MAX_TOKEN"):
        parsed("agent", {**env, "OMNI_MAX_TOKEN": "5"})  # not an option: source never "env"
    with pytest.raises(AssertionError, match="rejects"):
        parsed("agent", {**env, "OMNI_LAUNCHER": "k8s"})
    with pytest.raises(AssertionError, match="rejects"):
        parsed("agent", {**env, "OMNI_METRICS_PORT": "metrics"})
    reordered = copy.deepcopy(container)
    reordered["env"] = reordered["env"][::-1]
    with pytest.raises(AssertionError, match="not defined before"):
        container_env(reordered, "agent")
    wrong_field = copy.deepcopy(container)
    next(e for e in wrong_field["env"] if e["name"] == "POD_IP")["valueFrom"]["fieldRef"][
        "fieldPath"
    ] = "status.hostIP"
    with pytest.raises(AssertionError, match="POD_IP"):
        container_env(wrong_field, "agent")
    everywhere = copy.deepcopy(daemonset)
    everywhere["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]["matchExpressions"].pop()
    four = {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "4"}
    assert gpu_nodes_matched(daemonset, four) is False
    assert gpu_nodes_matched(everywhere, four) is True


# --- the servers run with the manifests' environment -------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def health(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as exc:
            # NOT_FOUND: the server does not know this service; the kubelet would fail the
            # probe for ever. Anything else: not up yet.
            assert exc.code() != grpc.StatusCode.NOT_FOUND, f"no health service {service!r}"
            return -1
        status: int = response.status
        return status


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_servers_start_from_the_manifests_and_answer_their_probes(tmp_path: Path) -> None:
    """A coordinator and an agent run with exactly the manifests' environment (ports moved to
    free ones on loopback, the sim engine instead of vLLM); every probe the kubelet would run
    answers SERVING, and the agent joins with its Kubernetes placement."""
    deployment, _ = coordinator_service()
    (daemonset,) = [d for d in docs_of("DaemonSet") if d["metadata"]["name"] == "omni-agent"]
    coordinator = first_container(deployment)
    agent = first_container(daemonset)
    moved = {p["containerPort"]: free_port() for c in (coordinator, agent) for p in c["ports"]}

    # Each Secret key becomes a file under tmp_path holding a made-up token, the same for
    # every container that mounts it (as the kubelet would mount one Secret everywhere).
    def secret_file(secret: str, key: str) -> str:
        path = tmp_path / "secrets" / secret / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{secret}-{key}-{os.getpid()}\n")
        return str(path)

    def localize(workload: Doc, container: Doc) -> dict[str, str]:
        mounted = secret_files(workload, container)
        out = {}
        for name, value in container_env(container, container["name"]).items():
            for old, new in moved.items():
                value = re.sub(rf"(^|:){old}$", rf"\g<1>{new}", value)
            if value in mounted:
                value = secret_file(*mounted[value])
            out[name] = value.replace("0.0.0.0:", "127.0.0.1:")
        return out

    coordinator_env = localize(deployment, coordinator)
    agent_env = localize(daemonset, agent)
    agent_env.update(
        OMNI_ENGINE="sim",
        OMNI_MODEL="sim",
        OMNI_COORDINATOR=f"127.0.0.1:{port_of(coordinator_env['OMNI_LISTEN'])}",
        OMNI_ADVERTISE=f"127.0.0.1:{port_of(agent_env['OMNI_LISTEN'])}",
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(settings.ENV_PREFIX)}
    base["OMNI_PARENT_PID"] = str(os.getpid())
    processes = []
    try:
        for module, env, name in (
            ("coordinator.main", coordinator_env, "coordinator"),
            ("node_agent.main", agent_env, "agent"),
        ):
            log = (tmp_path / f"{name}.log").open("w")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", module],
                    cwd=ROOT,
                    env={**base, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        for container in (coordinator, agent):
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe_name not in container:
                    continue
                probe = container[probe_name]["grpc"]
                port, service = moved[probe["port"]], probe.get("service", "")

                def serving(port: int = port, service: str = service) -> bool:
                    for process, name in zip(processes, ("coordinator", "agent"), strict=True):
                        assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
                    return health(port, service) == int(health_pb2.HealthCheckResponse.SERVING)

                wait_for(serving, 60, f"{container['name']} {probe_name} ({service!r})")
        address = coordinator_env["OMNI_LISTEN"]
        token = Path(coordinator_env["OMNI_CLIENT_TOKEN_FILE"]).read_text().strip()
        as_client = security.ChannelSecurity(token=token)

        def joined() -> bool:
            client = CoordinatorClient(address, security=as_client)
            try:
                return any(n.node_id == agent_env["OMNI_NODE_ID"] for n in client.nodes())
            finally:
                client.close()

        wait_for(joined, 30, "the agent to join")
        client = CoordinatorClient(address, security=as_client)
        try:
            (node,) = client.nodes()
        finally:
            client.close()
        assert node.node_id == f"{POD_VALUES['NODE_NAME']}-gpu0"
        assert node.placement.launcher == "kubernetes"
        assert (
            dict(node.placement.labels).items()
            >= {label: POD_VALUES[variable] for label, variable in K8S_LABEL_ENV.items()}.items()
        )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
