"""vmt-demo/cluster.py's reading of a namespace's /proc/net/snmp and netstat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

VMT_DEMO = Path(__file__).resolve().parents[3] / "vmt-demo"
if str(VMT_DEMO) not in sys.path:
    sys.path.insert(0, str(VMT_DEMO))

import cluster  # noqa: E402

SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Tcp: RtoAlgorithm ActiveOpens RetransSegs
Tcp: 1 12 345
"""
NETSTAT = """TcpExt: SyncookiesSent TCPTimeouts TCPSpuriousRTOs
TcpExt: 0 7 2
"""


def test_counters_are_named_by_group_and_key() -> None:
    found = cluster.parse_proc_net_counters(SNMP + NETSTAT)
    assert found["TcpRetransSegs"] == 345
    assert found["TcpExtTCPTimeouts"] == 7
    assert found["TcpExtTCPSpuriousRTOs"] == 2
    assert found["IpDefaultTTL"] == 64
    assert set(cluster.TCP_LOSS_COUNTERS.values()) <= set(found)


def test_this_machines_own_counters_parse() -> None:
    text = Path("/proc/net/snmp").read_text() + Path("/proc/net/netstat").read_text()
    found = cluster.parse_proc_net_counters(text)
    assert set(cluster.TCP_LOSS_COUNTERS.values()) <= set(found)


@pytest.mark.parametrize(
    "text",
    [
        "Tcp: RetransSegs\nIp: 5\n",  # values of another group
        "Tcp: RetransSegs ActiveOpens\nTcp: 5\n",  # a value missing
        "Tcp: RetransSegs\n",  # no values line
    ],
)
def test_out_of_step_text_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        cluster.parse_proc_net_counters(text)
