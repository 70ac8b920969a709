"""omni top: a live view of the cluster, refreshed every ``--interval`` seconds.

One ``GetStats`` call per refresh gives every node (state, in flight, the load its agent last
reported) and the coordinator's request totals. Tokens/s is the growth of a node's
``load.generated_tokens`` between two load reports divided by the time between them (the
coordinator refreshes a node's load at each health check, so a refresh that sees no new report
keeps the last rate instead of showing a false 0).

On a terminal the view redraws in place (``rich.live.Live``); otherwise (a pipe, a file) each
refresh is printed below the previous one, like ``top -b``. Ctrl-C quits with exit code 0.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omni_rpc import argtypes
from omni_rpc.sdk.client import CoordinatorClient, CoordinatorUnreachable, stats_dict
from omni_rpc.security import SecurityConfigError, client_security

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

DEFAULT_INTERVAL_S = 1.0
REASON_WIDTH = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``omni top``'s own options (``--coordinator`` is added by the caller, like elsewhere)."""
    parser.add_argument(
        "--interval",
        type=argtypes.positive_float,
        default=DEFAULT_INTERVAL_S,
        metavar="S",
        help="seconds between refreshes (default: %(default)s)",
    )
    parser.add_argument(
        "--iterations",
        type=argtypes.positive_int,
        metavar="N",
        help="stop after N refreshes (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--width",
        type=argtypes.positive_int,
        metavar="COLUMNS",
        help="width of the view (default: the terminal's, or $COLUMNS, or 80)",
    )
    parser.set_defaults(func=cmd_top)


# -- tokens/s ------------------------------------------------------------------------------


@dataclass
class _Sample:
    at: float  # when the coordinator fetched the load (its last_health_check_at)
    generated_tokens: int


@dataclass
class TokenRates:
    """Per-node tokens/s from successive load reports."""

    samples: dict[str, _Sample] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)

    def update(self, nodes: dict[str, dict[str, Any]]) -> None:
        for node_id in set(self.samples) - set(nodes):
            del self.samples[node_id]  # left the cluster
            self.rates.pop(node_id, None)
        for node_id, node in nodes.items():
            at = float(node["last_health_check_at"])
            tokens = int(node["load"]["generated_tokens"])
            if at <= 0:
                continue  # never probed: no load report yet
            previous = self.samples.get(node_id)
            if previous is not None and at <= previous.at:
                continue  # the same report as last time: keep the last rate
            self.samples[node_id] = _Sample(at, tokens)
            if previous is None or tokens < previous.generated_tokens:
                # First report, or the agent restarted (its counter began again): no rate yet.
                self.rates.pop(node_id, None)
                continue
            self.rates[node_id] = (tokens - previous.generated_tokens) / (at - previous.at)

    def rate(self, node_id: str) -> float | None:
        return self.rates.get(node_id)

    def total(self) -> float:
        return sum(self.rates.values())

    def clear(self) -> None:
        self.samples.clear()
        self.rates.clear()


# -- rendering -----------------------------------------------------------------------------

STATE_STYLES = {
    "healthy": "green",
    "joining": "cyan",
    "draining": "yellow",
    "unhealthy": "bold red",
    "left": "dim",
}


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _gpu(node: dict[str, Any]) -> str:
    index = int(node.get("gpu", -1))
    name = str(node.get("gpu_name") or "")
    visible = str(node.get("visible_devices") or "")
    if index < 0 and not visible:
        return "-"
    label = str(index) if index >= 0 else f"[{visible}]"
    return f"{label} {name}".strip()


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _note(node: dict[str, Any]) -> str:
    """Why a node is not healthy (or the last error of a healthy one)."""
    text = node["state_reason"] if node["state"] != "healthy" else node["last_error"]
    text = " ".join(str(text).split())
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 3] + "..."


def header_line(address: str, stats: dict[str, Any] | None, interval_s: float) -> str:
    clock = time.strftime("%H:%M:%S")
    if stats is None:
        return f"omni top  {address}  {clock}  every {interval_s:g}s"
    return (
        f"omni top  {address}  {clock}  every {interval_s:g}s  "
        f"strategy {stats['strategy']}  up {_uptime(stats['uptime_s'])}"
    )


def totals_line(stats: dict[str, Any], rates: TokenRates) -> str:
    nodes = stats["health_stats"].values()
    draining = sum(1 for node in nodes if node["state"] == "draining")
    parts = [
        f"{len(stats['healthy_nodes'])}/{stats['num_nodes']} nodes healthy"
        + (f" ({draining} draining)" if draining else ""),
        f"{stats['in_flight']} in flight",
        f"requests {stats['requests_succeeded']} ok, {stats['requests_failed']} failed, "
        f"{stats.get('requests_cancelled', 0)} cancelled",
        f"{rates.total():.1f} tok/s",
        f"{stats['retries_total']} retries",
        f"{stats['resumes_total']} resumed",
    ]
    if "failovers_total" in stats:  # not every coordinator reports it
        parts.insert(5, f"{stats['failovers_total']} failovers")
    return "  |  ".join(parts)


def render(
    address: str, stats: dict[str, Any], rates: TokenRates, interval_s: float
) -> RenderableType:
    """One frame: a header line, the node table, the totals line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    table.add_column("NODE", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("LAUNCHER", no_wrap=True)
    table.add_column("HOST", no_wrap=True, max_width=16, overflow="ellipsis")
    table.add_column("GPU", no_wrap=True, max_width=16, overflow="ellipsis")
    table.add_column("INFL/CAP", justify="right", no_wrap=True)
    table.add_column("RUN", justify="right", no_wrap=True)
    table.add_column("WAIT", justify="right", no_wrap=True)
    table.add_column("KV%", justify="right", no_wrap=True)
    table.add_column("SERVED", justify="right", no_wrap=True)
    table.add_column("FAIL", justify="right", no_wrap=True)
    table.add_column("TOK/S", justify="right", no_wrap=True)
    table.add_column("NOTE", overflow="ellipsis", no_wrap=True)
    nodes = sorted(stats["health_stats"].values(), key=lambda n: str(n["node_id"]))
    for node in nodes:
        load = node["load"]
        state = str(node["state"])
        table.add_row(
            str(node["node_id"]),
            Text(state, style=STATE_STYLES.get(state, "")),
            str(node.get("launcher") or "-"),
            str(node.get("host") or "-"),
            _gpu(node),
            f"{node['in_flight']}/{node['capacity']}",
            str(load["running"]),
            str(load["waiting"]),
            f"{100.0 * float(load['kv_cache_usage']):.0f}",
            str(node["served"]),
            str(node["failures"]),
            _rate(rates.rate(str(node["node_id"]))),
            _note(node),
        )
    parts: list[RenderableType] = [Text(header_line(address, stats, interval_s), style="bold")]
    parts.append(table if nodes else Text("(no nodes have joined)"))
    parts.append(Text(totals_line(stats, rates)))
    return Group(*parts)


def render_unreachable(address: str, error: str, interval_s: float) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    return Group(
        Text(header_line(address, None, interval_s), style="bold"),
        Text(f"{error} (retrying)", style="bold red"),
    )


# -- the loop ------------------------------------------------------------------------------


def make_console(width: int | None) -> Console:
    from rich.console import Console

    # Without --width rich takes the terminal's width, else $COLUMNS, else 80.
    return Console(width=width, highlight=False)


def cmd_top(args: argparse.Namespace) -> int:
    """Refresh until ``--iterations`` or Ctrl-C (exit 0); an unreachable coordinator at the
    start raises CoordinatorUnreachable (the CLI prints it and exits 1)."""
    console = make_console(args.width)
    try:
        channel_security = client_security(args)
    except SecurityConfigError as exc:
        raise SystemExit(f"omni: {exc}") from None
    client = CoordinatorClient(
        args.coordinator, timeout_s=max(2.0, args.interval), security=channel_security
    )
    try:
        rates = TokenRates()
        # The first call is outside the loop: a wrong address is an error, not a view of one.
        first = stats_dict(client.stats())
        rates.update(first["health_stats"])
        frames = _frames(client, args, rates, render(args.coordinator, first, rates, args.interval))
        if console.is_terminal:
            from rich.live import Live

            with Live(console=console, auto_refresh=False) as live:
                for frame in frames:
                    live.update(frame, refresh=True)
        else:
            for index, frame in enumerate(frames):
                if index:
                    console.print()
                console.print(frame)
                console.file.flush()
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _frames(
    client: CoordinatorClient, args: argparse.Namespace, rates: TokenRates, first: RenderableType
) -> Iterator[RenderableType]:
    """Yield ``first``, then a new frame every ``args.interval`` seconds."""
    yield first
    next_at = time.monotonic()
    count = 1
    while args.iterations is None or count < args.iterations:
        # On a fixed schedule (a slow call does not shift the later refreshes), but never
        # catching up with a burst after a stall.
        next_at = max(next_at + args.interval, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))
        count += 1
        try:
            stats = stats_dict(client.stats())
        except CoordinatorUnreachable as exc:
            rates.clear()  # rates across the gap would be wrong
            yield render_unreachable(args.coordinator, str(exc), args.interval)
            continue
        rates.update(stats["health_stats"])
        yield render(args.coordinator, stats, rates, args.interval)
