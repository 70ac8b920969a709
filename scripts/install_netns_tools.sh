#!/usr/bin/env bash
# iproute2 (ip netns, ss) and iptables, from Debian's packages, for the network-partition tests
# (tests/test_partitions.py: an agent in its own network namespace, cut off with iptables).
# Idempotent; where they cannot be installed it says why and exits 0, and those tests skip.
set -uo pipefail
source "$(dirname "$0")/apt_packages.sh"

if ensure_packages netns-tools "tests/test_partitions.py skips" iproute2 iptables; then
  echo "netns-tools: iproute2 and iptables are installed"
fi
exit 0
