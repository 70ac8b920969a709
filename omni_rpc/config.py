"""Defaults shared by the coordinator, the agents and the SDK: one place for each number.

The first block holds the defaults of the SDK's ``DistributedOrchestrator`` arguments (num_nodes,
load_balancing_strategy, health_check_interval, max_retries); the rest are the other defaults
and limits of the SDK and the servers.
"""

from __future__ import annotations

# DistributedOrchestrator's defaults.
DEFAULT_NUM_NODES = 2
DEFAULT_STRATEGY = "round_robin"
DEFAULT_HEALTH_CHECK_INTERVAL_S = 5.0
DEFAULT_MAX_RETRIES = 2
# Ray restarts a killed agent actor this many times (then the node stays gone).
RAY_MAX_RESTARTS = 3
# The engines an agent can run, and what can start an agent (reported in its placement).
ENGINES = ("sim", "vllm")
# The launchers the SDK and `omni up` use; an agent may also be started by Kubernetes or by hand.
LAUNCHERS = ("local", "ray")
AGENT_LAUNCHERS = (*LAUNCHERS, "kubernetes", "external")

# Engines: the model an agent serves when none is named, and how long a local cluster may
# take to become healthy (a real engine loads its model first). The SDK and `omni up` pick the
# engine from the model when none is given: SIM_MODEL (or no model) runs simulated agents,
# any other name runs vLLM; simulated output never carries a real model's name by default.
SIM_MODEL = "sim"
DEFAULT_MODELS = {"sim": SIM_MODEL, "vllm": "smollm2-135m-instruct"}


def engine_for(model: str | None) -> str:
    """The engine that serves ``model`` when none is named: simulated output only for no
    model or SIM_MODEL, never under a real model's name."""
    return "sim" if model in (None, "", SIM_MODEL) else "vllm"


STARTUP_TIMEOUT_S = {"sim": 60.0, "vllm": 600.0}

# Requests.
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_CAP = 8192
# A chat's shape (its size counts against the prompt byte limit like a prompt's).
MAX_CHAT_MESSAGES = 1024
MAX_CHAT_ROLE_CHARS = 64
# The fewest new tokens per streamed message (``stream_interval``): 1 sends every token as soon
# as it exists; the last message of a stream may carry fewer.
DEFAULT_STREAM_INTERVAL = 1
# Output a coordinator holds for one request whose client is not reading, in tokens; past it
# the request is aborted in the engine and the client gets RESOURCE_EXHAUSTED naming the limit.
MAX_BUFFERED_TOKENS = 4096
# Media output bytes a coordinator holds for one request: the pieces of an item not complete
# yet (an item is relayed only whole, so a failover never delivers part of one), and pieces a
# slow client has not taken. Past it the request fails RESOURCE_EXHAUSTED naming the limit.
MAX_HELD_MEDIA_BYTES = 64 * 1024 * 1024
# A completed media item is relayed to the client in messages of at most about this many bytes
# of media data each (whole pieces), well within every channel's message limit.
MEDIA_RELAY_MESSAGE_BYTES = 1024 * 1024
# Deadline applied by the SDK when the caller gives none; the coordinator itself imposes none.
DEFAULT_REQUEST_TIMEOUT_S = 600.0
# How long the SDK waits to connect to a coordinator it has never reached before failing
# (UNAVAILABLE, naming the address). Once reached, a coordinator that goes away (restarting)
# is waited for until each request's deadline.
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Where a cluster started by the SDK serves its HTTP front door (OpenAI-compatible; port 0:
# any free port), and the path of its API under that address (the openai client's base_url).
SDK_HTTP_LISTEN = "127.0.0.1:0"
HTTP_API_PATH = "/v1"

# Health checking: a Check must answer within this, else the node counts as unreachable.
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 2.0
# gRPC keepalive on coordinator -> agent channels (detects dead peers on idle connections), and
# the agents' default --keepalive-time / --keepalive-timeout towards their coordinators.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000

# SDK clients ping their coordinator connection every CLIENT_KEEPALIVE_TIME_S while calls are
# open and give it up when a ping is unanswered for CLIENT_KEEPALIVE_TIMEOUT_S: a stream on a
# coordinator that froze (SIGSTOP, a hung host, a partition) continues on another coordinator
# after at most about their sum (the coordinators accept pings that often: max_ping_strikes 0).
CLIENT_KEEPALIVE_TIME_S = 10.0
CLIENT_KEEPALIVE_TIMEOUT_S = 5.0


def client_keepalive(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Channel options for a client's keepalive (see CLIENT_KEEPALIVE_TIME_S)."""
    return [
        ("grpc.keepalive_time_ms", max(1, round(time_s * 1000))),
        ("grpc.keepalive_timeout_ms", max(1, round(timeout_s * 1000))),
        # A keepalive ping that finds another ping in flight waits for that one's answer under
        # this timeout (gRPC's default: a minute), not under keepalive_timeout.
        ("grpc.http2.ping_timeout_ms", max(1, round(timeout_s * 1000))),
        # Keep pinging while no data flows (a frozen peer sends nothing).
        ("grpc.http2.max_pings_without_data", 0),
    ]


# Backoff between attempts of one request (full jitter, capped).
RETRY_BACKOFF_BASE_S = 0.05
RETRY_BACKOFF_CAP_S = 2.0
# Backoff while waiting for any healthy node to appear.
NO_NODE_BACKOFF_BASE_S = 0.05
NO_NODE_BACKOFF_CAP_S = 1.0

# How often, at most, an agent reports its load on each coordinator's session (when it
# changed): several coordinators (or workers) share a node, each knowing only its own requests.
LOAD_REPORT_INTERVAL_S = 0.05
# A coordinator keeps a session open to every node for those reports: opened again this long
# after it breaks (a node that is down costs a failed call per interval).
SESSION_REOPEN_S = 1.0

# Agent membership: how often an agent refreshes its registration, and its re-join backoff.
# The refresh is a safety net: an agent watches the coordinator's health and re-joins at once
# when it is lost; each refresh costs the coordinator a Join and a new health stream per node.
JOIN_REFRESH_INTERVAL_S = 15.0
JOIN_BACKOFF_BASE_S = 0.2
# Capped low: an agent re-joins a coordinator that is back within about a health interval
# (the channel's reconnect backoff is capped at RECONNECT_MAX_BACKOFF_MS as well).
JOIN_BACKOFF_CAP_S = 2.0

# Graceful shutdown: in-flight calls get this long to finish after SIGTERM.
SHUTDOWN_GRACE_S = 10.0

# Services named in grpc.health.v1 by each server, besides "".
COORDINATOR_SERVICE = "omni.v1.Coordinator"
REGISTRY_SERVICE = "omni.v1.Registry"
NODE_AGENT_SERVICE = "omni.v1.NodeAgent"

# Message size limit of every channel we open and of what our servers send (agents also receive
# up to this); the coordinator takes at most --max-message-bytes (MAX_CLIENT_MESSAGE_BYTES) from
# its clients.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

GRPC_MESSAGE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# Reconnect backoff of every channel we open. gRPC's own grows to 120 s, so after a long
# outage a peer that is back is not dialed again for up to two minutes (measured: agents
# re-joined a coordinator 74 s after it returned from a 120 s outage). Capped here, a returning
# peer is dialed again within about a second, whatever the outage length; a dead one costs a
# connection attempt per second. gRPC shares subchannels between the channels of one process,
# so a new channel would otherwise inherit an old one's long backoff too.
RECONNECT_INITIAL_BACKOFF_MS = 100
RECONNECT_MAX_BACKOFF_MS = 1_000
# How long one connection attempt may take (gRPC calls it min_reconnect_backoff; its default
# is 20 s). Through a partition an attempt's SYNs go unanswered and the kernel retransmits
# them at growing intervals (1, 2, 4, 8 s): a long attempt may be asleep for seconds when the
# network heals. 5 s keeps the gap to the next SYN at about 2 s, and is still ample for TCP,
# TLS and HTTP/2 set-up across regions.
RECONNECT_CONNECT_TIMEOUT_MS = 5_000
RECONNECT_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_BACKOFF_MS),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_BACKOFF_MS),
    ("grpc.min_reconnect_backoff_ms", RECONNECT_CONNECT_TIMEOUT_MS),
]

# Limits on what one caller may ask of the coordinator (coordinator/admission.py); over a
# limit the call is RESOURCE_EXHAUSTED, naming it.
# Largest request message the coordinator accepts from clients (an HTTP body too): room for
# MAX_MEDIA_BYTES of media, base64-encoded in JSON (4/3 larger), and a prompt.
MAX_CLIENT_MESSAGE_BYTES = 48 * 1024 * 1024
MAX_PROMPT_BYTES = 1024 * 1024
# Media data of one request (GenerateRequest.inputs and chat media parts), not counted as prompt
# bytes. With the largest prompt it must fit what an agent receives (MAX_MESSAGE_BYTES).
MAX_MEDIA_BYTES = 32 * 1024 * 1024
# Room in an agent-bound message for everything of a request but its prompt and media.
REQUEST_OVERHEAD_BYTES = 1024 * 1024
MAX_REQUEST_ID_CHARS = 256
MAX_STREAMS = 10_000
MAX_STREAMS_PER_CLIENT = 1_000
# Requests admitted beyond the healthy nodes' total capacity (waiting on engines or for a node).
MAX_QUEUE = 1_000

# Without a caller deadline, Generate waits this long for a healthy node before giving up.
NO_NODE_WAIT_S = 30.0
# Calls to the registry and probes from an agent.
JOIN_TIMEOUT_S = 5.0

# Channel options of coordinator -> agent channels: keepalive pings even when idle, so a peer
# that vanished without closing its socket is noticed.
KEEPALIVE_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# The coordinator's channel to an agent carries its multiplexed session. A small, fixed receive
# window (no growth by bandwidth probing) keeps the agent from running far ahead of a busy
# coordinator: its writes wait, and the output of each request merges on the agent into fewer,
# larger messages, instead of thousands of small ones queued in the transport, each costing
# the coordinator a read and every new request's first token waiting behind them. Measured
# (zero engine time, 64 streams of 100 tokens, 2 agents): 12k tokens/s with the default
# growing window, 22k at 32 KiB, 30k at 8 KiB, 32k at 4 KiB; 256 paced streams unchanged.
# Outputs far larger than the window (media) take a round trip per window's worth.
SESSION_WINDOW_BYTES = 4 * 1024
# Starts of several requests travel in one session message up to this size; a larger request
# (media inputs) goes in a message of its own, so no message exceeds MAX_MESSAGE_BYTES.
SESSION_BATCH_BYTES = 8 * 1024 * 1024
SESSION_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", SESSION_WINDOW_BYTES),
]
# Servers must accept those pings, or they answer GOAWAY "too_many_pings".
KEEPALIVE_SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
]

# Circuit breaker (outlier detection): eject after this many consecutive node-level request
# failures, for base * (number of ejections) seconds, at most max.
BREAKER_CONSECUTIVE_FAILURES = 5
BREAKER_BASE_EJECTION_S = 30.0
BREAKER_MAX_EJECTION_S = 300.0
# An unhealthy node is re-admitted after this many consecutive passing probes (hysteresis),
# re-probed with backoff from PROBE_BACKOFF_BASE_S up to the health-check interval.
READMIT_AFTER_PROBES = 2
PROBE_BACKOFF_BASE_S = 0.1
# A Check that has not answered within --health-check-timeout stops new work going to the node
# at once, but the node is ejected (its streams failed over) only if the answer has still not
# come after this many timeouts in all: a host under CPU load answers late, a frozen or cut-off
# one never does, and only the second deserves an ejection.
PROBE_CONFIRM_TIMEOUTS = 2.0

# Flap damping: a node that fails its probes again within FLAP_WINDOW_S of being re-admitted
# is held out for FLAP_BASE_HOLD_S * 2^(n-1) seconds (n: its flaps in a row, capped at
# FLAP_MAX_HOLD_S; --flap-hold and --flap-max-hold) before passing probes may re-admit it; the
# count is forgiven once it stays up for FLAP_FORGIVE_S.
FLAP_WINDOW_S = 10.0
FLAP_BASE_HOLD_S = 2.0
FLAP_MAX_HOLD_S = 120.0
FLAP_FORGIVE_S = 60.0

# A node unreachable for this long is forgotten (removed from the registry, no longer probed);
# an agent that comes back simply joins again. 0 keeps unreachable nodes forever.
FORGET_AFTER_S = 600.0

# Stall detection (coordinator/stalls.py): an attempt whose node has produced nothing for longer
# than its bound is failed over with resume, and the stall counts against the node. The bound
# is the larger of --stall-timeout and STALL_FACTOR times what the node usually takes (its
# recent time to first output, or its recent longest gap between outputs), plus, before the
# first output, STALL_PREFILL_S_PER_TOKEN for each prompt token (a long prompt takes longer to
# prefill; a resumed attempt's prompt includes the tokens already delivered).
STALL_TIMEOUT_S = 15.0
STALL_FACTOR = 4.0
STALL_PREFILL_S_PER_TOKEN = 0.002
# A caller deadline that expires after the node has been silent at least this long (and longer
# than STALL_FACTOR times its usual wait) counts against the node.
STALL_BLAME_MIN_S = 1.0
# Weight of the newest attempt in a node's usual time to first output and gap (EWMA).
STALL_HISTORY_WEIGHT = 0.2

# Latency outlier ejection (coordinator/outliers.py): every OUTLIER_INTERVAL_S, a healthy node
# whose typical decode pace, time per output token after the first (the median of its last
# OUTLIER_MAX_SAMPLES attempts within OUTLIER_WINDOW_S, once it has OUTLIER_MIN_SAMPLES), is
# more than OUTLIER_LATENCY_FACTOR times, and OUTLIER_MIN_FLOOR_S more than, its peers' median
# is ejected like a breaker ejection (--breaker-base-ejection times its ejections); never more
# than OUTLIER_MAX_EJECTED_FRACTION of the nodes at once.
OUTLIER_INTERVAL_S = 5.0
OUTLIER_LATENCY_FACTOR = 3.0
OUTLIER_MIN_FLOOR_S = 0.005
OUTLIER_MIN_SAMPLES = 5
OUTLIER_WINDOW_S = 30.0
OUTLIER_MAX_EJECTED_FRACTION = 0.5
OUTLIER_MAX_SAMPLES = 64

# Set by the launcher: a child shuts down when this process is gone.
PARENT_PID_ENV = "OMNI_PARENT_PID"
ORPHAN_CHECK_INTERVAL_S = 0.5

# Trailing metadata key the coordinator sets on errors that are its final answer.
FINAL_ERROR_METADATA = "omni-final"

# -- Coordinator workers (`omni-coordinator --workers N`; coordinator/control.py, worker.py) --
# One control process (registry, health, breaker, stats, metrics) and N data-plane processes
# serving Generate on the shared port. The default keeps everything in one process.
DEFAULT_COORDINATOR_WORKERS = 1
# How long the control process waits for a worker to attach at start (and after a restart),
# and how long it lets workers drain past --shutdown-grace before it kills them.
WORKER_START_TIMEOUT_S = 60.0
WORKER_STOP_MARGIN_S = 5.0
# A worker that dies is restarted after this backoff (doubling up to the cap).
WORKER_RESTART_BACKOFF_BASE_S = 0.5
WORKER_RESTART_BACKOFF_CAP_S = 10.0
# How long GetStats, ListNodes and /metrics wait for every worker's counters.
WORKER_STATS_TIMEOUT_S = 2.0
# How long DrainNode waits for every worker to acknowledge the drained node's new state.
WORKER_ACK_TIMEOUT_S = 5.0
# The internal service between the control process and its workers (over a unix socket).
CONTROL_PLANE_SERVICE = "omni.v1.ControlPlane"

# Call metadata the coordinator may send to an agent: the node id and incarnation (JoinRequest)
# it means to reach. An agent whose own differ refuses the call with FAILED_PRECONDITION
# ("node identity mismatch: ..."): another process now listens at that address.
NODE_ID_METADATA = "omni-node-id"
NODE_INCARNATION_METADATA = "omni-node-incarnation"
# How the details of that refusal begin (the coordinator recognises it by this).
IDENTITY_MISMATCH_PREFIX = "node identity mismatch: "
