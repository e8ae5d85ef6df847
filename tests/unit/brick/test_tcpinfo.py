"""brick.tcpinfo: bytes received per peer of one process, from ``ss -tinpH`` output."""

from __future__ import annotations

import pytest

from brick import tcpinfo
from brick.executor import Result

pytestmark = pytest.mark.unit

# The shape of `ss -tinpH state established` on Debian 12 (iproute2 6.1), cut short.
SS = """\
0      0      10.0.0.3:51234 10.0.0.2:10809 users:(("qemu-storage-da",pid=4242,fd=13))
\t cubic wscale:7,7 rto:204 bytes_sent:1440 bytes_acked:1441 bytes_received:722812 segs_out:34
0      0      10.0.0.3:51240 10.0.0.2:10809 users:(("qemu-storage-da",pid=4242,fd=14))
\t cubic wscale:7,7 rto:204 bytes_sent:40 bytes_acked:41 segs_out:2
0 0 [::ffff:10.0.0.3]:40000 [::ffff:10.0.0.1]:3260 users:(("qemu-storage-da",pid=4242,fd=15))
\t cubic bytes_received:5120 segs_in:9
0      0      10.0.0.3:3260 10.0.0.4:50000 users:(("tgtd",pid=4300,fd=9))
\t cubic bytes_sent:999 bytes_received:77
0      0      [fd00::3]:41000 [fd00::9]:10809 users:(("qemu-storage-da",pid=42420,fd=3))
\t cubic bytes_received:1
"""


def test_parse_keeps_only_the_process_sockets_per_canonical_peer() -> None:
    assert tcpinfo.parse(SS, 4242) == {
        ("10.0.0.2", 10809): [722812, 0],  # no bytes_received yet: 0
        ("10.0.0.1", 3260): [5120],  # an IPv4-mapped peer as IPv4
    }
    assert tcpinfo.parse(SS, 42420) == {("fd00::9", 10809): [1]}  # not pid 4242's
    assert tcpinfo.parse("", 4242) == {}


def test_received_runs_ss_without_a_shell() -> None:
    calls = []

    def run(argv: list[str], **kw: object) -> Result:
        calls.append(argv)
        return Result(SS, "", 0)

    assert tcpinfo.received(4300, run=run) == {("10.0.0.4", 50000): [77]}
    assert calls == [["ss", "-tinpH", "state", "established"]]


def test_canonical_addresses_and_names() -> None:
    assert tcpinfo.canonical("[FD00:0::5]") == "fd00::5"
    assert tcpinfo.canonical("::ffff:10.0.0.5") == "10.0.0.5"
    assert tcpinfo.canonical("node-3.example") is None
