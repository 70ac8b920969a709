"""The long variants of tests/test_reconnect.py and tests/test_partitions.py: a 120 s
coordinator outage, a 120 s freeze and a 120 s network partition of an agent.

With gRPC's default reconnect backoff (grown to ~70 s by then) agents re-joined a coordinator
back from a 120 s outage 74 s after it returned; with ours, within a few seconds, as after a
short outage. Each takes about 2.5 minutes, so ``make test`` skips them and ``make chaos`` runs
them (it sets OMNI_LONG_CHAOS=1).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from tests import netns
from tests.test_partitions import namespace, partitioned_readmit, remote_agent
from tests.test_reconnect import MakeCluster, coordinator_outage_rejoin, frozen_agent_readmit

LONG_S = 120.0

pytestmark = pytest.mark.skipif(
    os.environ.get("OMNI_LONG_CHAOS") != "1",
    reason="120 s outages: run by `make chaos` (or set OMNI_LONG_CHAOS=1)",
)


def test_agents_rejoin_a_coordinator_back_from_a_120s_outage(make_cluster: MakeCluster) -> None:
    coordinator_outage_rejoin(make_cluster, LONG_S)


def test_an_agent_frozen_for_120s_is_readmitted_soon_after_it_thaws(
    make_cluster: MakeCluster,
) -> None:
    frozen_agent_readmit(make_cluster, LONG_S)


@pytest.mark.skipif(bool(netns.unavailable()), reason="network namespaces unavailable here")
def test_an_agent_partitioned_for_120s_is_readmitted_soon_after_the_heal(
    make_cluster: MakeCluster,
    namespace: netns.Namespace,
    remote_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    partitioned_readmit(make_cluster, namespace, remote_agent, LONG_S)


__all__ = ["namespace", "remote_agent"]  # fixtures used above
