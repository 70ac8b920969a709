"""Start a coordinator and agents on this machine as child processes.

Used by the SDK (``DistributedOrchestrator`` without ``coordinator=``) and ``omni up``. The
children are the real servers (``python -m coordinator`` / ``python -m node_agent``); each is
given the parent's pid (``OMNI_PARENT_PID``) and shut down when it is gone, so a crashed parent
leaves no orphans. (No ``preexec_fn``: forking a process that runs gRPC threads can abort the
child inside gRPC's fork handlers before it reaches exec.)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from omni_rpc import config
from omni_rpc.launchers import cpus
from omni_rpc.security import ROLES, ChannelSecurity

# "(EngineCore pid=1557) INFO 11-27 08:40:23 [core.py:133] " in front of vLLM's messages.
VLLM_LOG_PREFIX = re.compile(
    r"^(\([\w:-]+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:]+ \[[^\]]*\] "
)


T = TypeVar("T")


class LaunchError(RuntimeError):
    """A child process failed to start; the message carries the end of its log."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def last_event(self) -> str:
        """What the child's log says last (see ``last_log_event``)."""
        return last_log_event(self.log_path)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


def last_log_event(path: Path) -> str:
    """What a server's log says last: a JSON line's "event", or a message of vLLM's logger
    (warnings, progress bars and continuation lines are skipped); "" for nothing yet."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            tail = log.read().decode(errors="replace")
    except OSError:
        return ""
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "event" in record:
                return str(record["event"])
            continue
        prefix = VLLM_LOG_PREFIX.match(line)
        if prefix:
            return "vllm: " + line[prefix.end() :].strip()
    return ""


def http_url(host_port: str) -> str:
    """The base URL (OpenAI's base_url) of an HTTP front door listening at ``host_port``."""
    host, port = host_port.rsplit(":", 1)
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"  # listening on every interface: reachable on loopback
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{config.HTTP_API_PATH}"


@dataclass
class LocalCluster:
    """``num_coordinators`` coordinators (one by default) plus ``num_nodes`` agents, all local
    child processes. The agents join every coordinator (``coordinator_target``).

    ``coordinator``, ``coordinator_address``, ``http_address`` and ``http_url`` are the first
    coordinator's; ``coordinators``, ``coordinator_addresses``, ``http_addresses`` and
    ``http_urls`` list every coordinator's, by index. Coordinator ``i`` logs to
    ``coordinator.log`` (``i == 0``) or ``coordinator-{i}.log``."""

    num_nodes: int = config.DEFAULT_NUM_NODES
    strategy: str = config.DEFAULT_STRATEGY
    health_check_interval: float = config.DEFAULT_HEALTH_CHECK_INTERVAL_S
    max_retries: int = config.DEFAULT_MAX_RETRIES
    engine: str = "sim"
    model: str = "sim"
    coordinator_listen: str = "127.0.0.1:0"
    # Where the coordinator serves its HTTP front door (port 0: any free port; None: none).
    http_listen: str | None = None
    coordinator_args: Sequence[str] = ()
    agent_args: Sequence[str] = ()
    # Per-agent extra arguments, by index (e.g. a slower simulated node).
    per_agent_args: dict[int, Sequence[str]] = field(default_factory=dict)
    # The GPU each agent owns, by index (None: CPU agents); see omni_rpc.launchers.gpus.assign.
    gpus: Sequence[int] | None = None
    # CPU vLLM agents (no GPUs): "auto" gives each its own share of this process's cores
    # (--cpu-cores, see omni_rpc.launchers.cpus), "none" leaves vLLM's own binding.
    cpu_cores: str = "auto"
    # Tokens for every role, made at start and handed to the children in files (0600 in
    # log_dir); False runs the cluster with --auth off, which suits loopback-only use.
    auth: bool = False
    tokens: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    log_format: str = "json"
    coordinator_address: str = ""
    # The HTTP front door's base URL (http://HOST:PORT/v1) once it listens; "" without one.
    http_url: str = ""
    http_address: str = ""
    coordinator: Child | None = None
    agents: list[Child] = field(default_factory=list)
    # Each agent's --cpu-cores, by index (empty: no binding); decided at start.
    agent_cores: list[str] = field(default_factory=list)
    # How many coordinators to start, each with its own registry (nothing shared); the agents
    # join every one. Each listens on coordinator_listen's host: port 0 gives each its own free
    # port, a fixed port P gives coordinator i the port P + i (http_listen likewise).
    num_coordinators: int = 1
    # Every coordinator, by index (the first is also ``coordinator`` and so on above).
    coordinators: list[Child] = field(default_factory=list)
    coordinator_addresses: list[str] = field(default_factory=list)
    # Each coordinator's HTTP front door (HOST:PORT and base URL), by index; empty without one.
    http_addresses: list[str] = field(default_factory=list)
    http_urls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.auth and not self.tokens:
            self.tokens = {role: secrets.token_urlsafe(32) for role in ROLES}
        if self.cpu_cores not in cpus.CPU_MODES:
            known = ", ".join(cpus.CPU_MODES)
            raise ValueError(f"cpu_cores must be one of {known}, got {self.cpu_cores!r}")
        if self.num_coordinators < 1:
            raise ValueError(f"num_coordinators must be at least 1, got {self.num_coordinators}")

    @property
    def coordinator_target(self) -> str:
        """What the agents get as ``--coordinator``, and what a client of every coordinator
        dials: each coordinator's address, comma-joined (with one, its address)."""
        if self.coordinator_addresses:
            return ",".join(self.coordinator_addresses)
        return self.coordinator_address

    def coordinator_listen_for(self, index: int) -> str:
        """Where coordinator ``index`` listens (see ``num_coordinators``)."""
        return _nth_listen(self.coordinator_listen, index)

    def http_listen_for(self, index: int) -> str | None:
        """Where coordinator ``index`` serves its HTTP front door (None: none)."""
        return None if self.http_listen is None else _nth_listen(self.http_listen, index)

    def plan_cpu_cores(self) -> list[str]:
        """Each agent's --cpu-cores: CPU vLLM agents split this process's cores, unless
        ``cpu_cores`` is "none" or the agents' arguments already bind them."""
        given = "--cpu-cores" in self.agent_args or any(
            "--cpu-cores" in extra for extra in self.per_agent_args.values()
        )
        if (
            self.engine != "vllm"
            or self.gpus
            or self.cpu_cores == "none"
            or given
            or self.num_nodes < 1
        ):
            return []
        return cpus.agent_core_lists(self.num_nodes)

    def start(
        self,
        startup_timeout_s: float = 30.0,
        on_coordinator: Callable[[LocalCluster], None] | None = None,
    ) -> str:
        """Start every process; return ``coordinator_target`` once every coordinator listens
        (with one coordinator, its address). ``on_coordinator`` is called once they listen,
        before the agents start."""
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="omni-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for role, token in self.tokens.items():
            path = self.token_file(role)
            path.touch(mode=0o600)
            path.write_text(token + "\n")
        for index in range(self.num_coordinators):
            self.start_coordinator(
                self.coordinator_listen_for(index),
                startup_timeout_s,
                self.http_listen_for(index),
                index=index,
            )
        if on_coordinator is not None:
            on_coordinator(self)
        self.start_agents()
        return self.coordinator_target

    def start_agents(self) -> None:
        """Start every agent (the coordinator must be listening)."""
        self.agent_cores = self.plan_cpu_cores()
        for index in range(self.num_nodes):
            self.start_agent(index)

    def start_coordinator(
        self,
        listen: str,
        startup_timeout_s: float,
        http_listen: str | None = None,
        index: int = 0,
    ) -> None:
        """Start coordinator ``index`` on ``listen`` (and its HTTP front door on
        ``http_listen``, default ``self.http_listen``); return once both listen. It replaces
        any coordinator ``index`` had (``index`` at most the number started so far)."""
        assert self.log_dir is not None
        if not 0 <= index <= len(self.coordinators):
            raise ValueError(
                f"coordinator index {index}: {len(self.coordinators)} started so far, "
                "start them in order"
            )
        http_listen = http_listen or self.http_listen
        name = coordinator_name(index)
        port_file = self.log_dir / f"{name}.port"
        port_file.unlink(missing_ok=True)
        http_port_file = self.log_dir / f"{name}.http.port"
        http_port_file.unlink(missing_ok=True)
        http_args = (
            ["--http-listen", http_listen, "--http-port-file", str(http_port_file)]
            if http_listen
            else []
        )
        child = self._spawn(
            name,
            [
                "-m",
                "coordinator",
                "--listen",
                listen,
                "--strategy",
                self.strategy,
                "--health-check-interval",
                str(self.health_check_interval),
                "--max-retries",
                str(self.max_retries),
                "--port-file",
                str(port_file),
                *http_args,
                *self._auth_args(ROLES),
                *self.coordinator_args,
            ],
        )
        _put(self.coordinators, index, child)
        if index == 0:
            self.coordinator = child
        deadline = time.monotonic() + startup_timeout_s
        port = self._wait_for_port(child, port_file, startup_timeout_s)
        address = f"{listen.rsplit(':', 1)[0]}:{port}"
        _put(self.coordinator_addresses, index, address)
        if index == 0:
            self.coordinator_address = address
        if http_listen:
            left = max(1.0, deadline - time.monotonic())
            http_port = self._wait_for_port(child, http_port_file, left)
            http_address = f"{http_listen.rsplit(':', 1)[0]}:{http_port}"
            _put(self.http_addresses, index, http_address, fill="")
            _put(self.http_urls, index, http_url(http_address), fill="")
            if index == 0:
                self.http_address = http_address
                self.http_url = http_url(http_address)
        elif index < len(self.http_addresses):
            self.http_addresses[index] = ""
            self.http_urls[index] = ""

    def token_file(self, role: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{role}.token"

    def _auth_args(self, roles: Sequence[str]) -> list[str]:
        if not self.auth:
            return ["--auth", "off"]
        return [arg for r in roles for arg in (f"--{r}-token-file", str(self.token_file(r)))]

    def client_security(self, role: str = "admin") -> ChannelSecurity:
        """How a client of this cluster authenticates (no token when auth is off)."""
        return ChannelSecurity(token=self.tokens.get(role))

    def restart_coordinator(self, startup_timeout_s: float = 30.0, index: int = 0) -> None:
        """Stop coordinator ``index`` (if it still runs) and start a new one on the same
        address (and HTTP address); the agents are untouched and join it again."""
        child = self.coordinators[index]
        self._stop_child(child)
        http = self.http_addresses[index] if index < len(self.http_addresses) else ""
        self.start_coordinator(
            self.coordinator_addresses[index], startup_timeout_s, http or None, index=index
        )

    def kill_coordinator(self, index: int, sig: int = signal.SIGKILL) -> Child:
        """Send ``sig`` to coordinator ``index`` (for chaos tests); for SIGKILL, return once
        it is gone. ``restart_coordinator(index=index)`` brings it back on its address."""
        child = self.coordinators[index]
        if child.alive:
            child.process.send_signal(sig)
            if sig == signal.SIGKILL:
                child.process.wait(15)
        return child

    def agent_argv(self, index: int, extra: Sequence[str] = ()) -> list[str]:
        """Agent ``index``'s arguments to the Python interpreter (``--log-format`` is added
        at spawn): it joins every coordinator (``coordinator_target``)."""
        name = f"node-{index}"
        return [
            "-m",
            "node_agent",
            "--coordinator",
            self.coordinator_target,
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            name,
            "--engine",
            self.engine,
            "--model",
            self.model,
            "--launcher",
            "local",
            *self._auth_args(["node"]),
            *(["--gpu", str(self.gpus[index])] if self.gpus else []),
            *(["--cpu-cores", self.agent_cores[index]] if index < len(self.agent_cores) else []),
            *self.agent_args,
            *self.per_agent_args.get(index, ()),
            *extra,
        ]

    def start_agent(self, index: int, extra: Sequence[str] = ()) -> Child:
        assert self.log_dir is not None
        child = self._spawn(f"node-{index}", self.agent_argv(index, extra))
        if index < len(self.agents):
            self.agents[index] = child
        else:
            self.agents.append(child)
        return child

    def _spawn(self, name: str, argv: list[str]) -> Child:
        assert self.log_dir is not None
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[config.PARENT_PID_ENV] = str(os.getpid())
        process = subprocess.Popen(
            [sys.executable, *argv, "--log-format", self.log_format],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log_file.close()
        return Child(name, process, log_path)

    @staticmethod
    def _wait_for_port(child: Child, port_file: Path, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if port_file.exists():
                return int(port_file.read_text())
            if not child.alive:
                raise LaunchError(
                    f"{child.name} exited with code {child.process.returncode} while starting:\n"
                    + child.log_tail()
                )
            time.sleep(0.02)
        raise LaunchError(
            f"{child.name} did not start within {timeout_s:.0f}s:\n" + child.log_tail()
        )

    @staticmethod
    def _stop_child(child: Child, timeout_s: float = 15.0) -> None:
        if child.alive:
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def check_alive(self) -> None:
        """Raise LaunchError naming any child (a coordinator or an agent) that has exited."""
        for child in self._coordinator_children() + self.agents:
            if not child.alive:
                raise LaunchError(
                    f"{child.name} exited with code {child.process.returncode}:\n"
                    + child.log_tail()
                )

    def _coordinator_children(self) -> list[Child]:
        """Every coordinator started (``coordinator`` alone where the list was not kept)."""
        if self.coordinators:
            return list(self.coordinators)
        return [self.coordinator] if self.coordinator is not None else []

    def stop(self) -> None:
        """SIGTERM every child (agents first, so they leave cleanly), then wait."""
        for child in self.agents:
            if child.alive:
                child.process.send_signal(signal.SIGTERM)
        for child in self.agents:
            self._stop_child(child)
        coordinators = self._coordinator_children()
        for child in coordinators:
            if child.alive:
                child.process.send_signal(signal.SIGTERM)
        for child in coordinators:
            self._stop_child(child)


def coordinator_name(index: int) -> str:
    """Coordinator ``index``'s name: its log is ``{name}.log``, its port file ``{name}.port``."""
    return "coordinator" if index == 0 else f"coordinator-{index}"


def _nth_listen(listen: str, index: int) -> str:
    """``listen`` for the ``index``-th of several servers: port 0 stays 0 (each its own free
    port), a fixed port P becomes P + index."""
    host, port = listen.rsplit(":", 1)
    if index == 0 or int(port) == 0:
        return listen
    return f"{host}:{int(port) + index}"


def _put(items: list[T], index: int, value: T, fill: T | None = None) -> None:
    """``items[index] = value``, appending where ``index`` is the next (``fill`` pads gaps)."""
    while len(items) < index and fill is not None:
        items.append(fill)
    if index < len(items):
        items[index] = value
    else:
        items.append(value)
