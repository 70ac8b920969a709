"""Network partitions for tests: a process in its own network namespace, cut off and healed
with iptables.

A namespace gets one veth pair to the host (10.211.N.1 on the host side, 10.211.N.2 inside).
``cut()`` drops every packet on the namespace's side of the pair, in both directions, so
peers see what a real partition does: no FIN, no RST, just silence (unlike a killed process,
whose kernel closes its sockets, or a frozen one, whose kernel still accepts connections).
Needs root, ``ip`` (iproute2) and ``iptables``; ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence

_ids = itertools.count(1)


def unavailable() -> str:
    """Why partitions cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "network partitions need root (ip netns, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"network partitions need {tool} (apt-get install iproute2 iptables)"
    probe = f"omni-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Namespace:
    """A network namespace joined to the host by a veth pair; ``close()`` removes both."""

    def __init__(self) -> None:
        n = (os.getpid() * 16 + next(_ids)) % 250 + 1
        self.name = f"omni-{os.getpid()}-{n}"
        self.host_if, self.inner_if = f"vo{n}h{os.getpid() % 1000}", f"vo{n}n{os.getpid() % 1000}"
        self.host_ip, self.inner_ip = f"10.211.{n}.1", f"10.211.{n}.2"
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.inner_if)
            _run("ip", "link", "set", self.inner_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            self.exec_("ip", "addr", "add", f"{self.inner_ip}/30", "dev", self.inner_if)
            self.exec_("ip", "link", "set", self.inner_if, "up")
            self.exec_("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def exec_(self, *argv: str) -> None:
        _run(*self.command(argv))

    def cut(self) -> None:
        """Drop everything between the namespace and the host, both ways."""
        self.exec_("iptables", "-A", "INPUT", "-i", self.inner_if, "-j", "DROP")
        self.exec_("iptables", "-A", "OUTPUT", "-o", self.inner_if, "-j", "DROP")

    def heal(self) -> None:
        self.exec_("iptables", "-F")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
