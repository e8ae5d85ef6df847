"""brick/values.py: the one rule for iSCSI names, portals, IPv6 brackets, ports and netns names."""

from __future__ import annotations

import pytest

from brick import values
from brick.exception import InvalidArgument
from brick.values import IQN, Portal


@pytest.mark.parametrize(
    "name",
    [
        "iqn.2010-10.org.openstack:volume-image1",
        "iqn.2024-01.org.example",
        "iqn.2024-12.com.example.host-1:a.b_c:d-e",
        "iqn.2003-01.org.linux-iscsi.host:sn.1234",
        "eui.02004567A425678D",
        "iqn.2024-01.o:" + "x" * (223 - len("iqn.2024-01.o:")),
    ],
)
def test_iqn_accepts(name: str) -> None:
    assert IQN.parse(name) == name
    assert isinstance(IQN.parse(name), str)


@pytest.mark.parametrize(
    "name",
    [
        "",
        None,
        "iqn.2024-13.org.example:a",  # month 13
        "iqn.2024-00.org.example:a",  # month 0
        "iqn.٢٠٢٤-01.org.example:a",  # Arabic-Indic digits
        "iqn.\uff12\uff10\uff12\uff14-01.org.example:a",  # full-width digits
        "iqn.2024-01.org.exampl\u0435:a",  # a Cyrillic letter
        "iqn.24-01.org.example:a",
        "iqn.2024-01.:a",
        "iqn.2024-01.org..example:a",
        "iqn.2024-01.org.example-:a",
        "iqn.2024-01.ORG.example:a",
        "iqn.2024-01.org.example:",
        "iqn.2024-01.org.example:a b",
        "iqn.2024-01.org.example:a/b",
        "iqn.2024-01.org.example:a\n",
        "iqn.2024-01.o:" + "x" * (224 - len("iqn.2024-01.o:")),
        "eui.0123",
        "eui.02004567A425678D0",
        "naa.52004567BA64678D",  # naa only where asked for
    ],
)
def test_iqn_refuses(name: object) -> None:
    with pytest.raises(ValueError):
        IQN.parse(name)
    assert not IQN.is_valid(name)


def test_iqn_forms() -> None:
    assert IQN.parse("naa.52004567BA64678D", forms=IQN.FORMS)
    assert IQN.parse("naa." + "f" * 32, forms=IQN.FORMS)
    assert not IQN.is_valid("naa." + "f" * 24, forms=IQN.FORMS)
    assert not IQN.is_valid("eui.02004567A425678D", forms=("iqn",))


def test_brick_iqn_raises_invalid_argument_with_the_field() -> None:
    assert values.iqn("iqn.2010-10.org.x:a") == "iqn.2010-10.org.x:a"
    with pytest.raises(InvalidArgument, match=r"invalid target 'iqn\.2010-13\.org\.x'") as err:
        values.iqn("iqn.2010-13.org.x", "target")
    assert err.value.field == "target"
    assert "<= 223 chars" in err.value.rule


def test_bracket_and_unbracket() -> None:
    assert values.bracket("fd00::1") == "[fd00::1]"
    assert values.bracket("10.0.0.1") == "10.0.0.1"
    assert values.bracket("node-1") == "node-1"
    assert values.unbracket("[fd00::1]") == "fd00::1"
    assert values.unbracket("[[fd00::1]]") == "[fd00::1]"  # once only
    assert values.unbracket("10.0.0.1") == "10.0.0.1"
    assert values.join_host_port("::1", 3260) == "[::1]:3260"
    assert values.join_host_port("127.0.0.1", "vol") == "127.0.0.1:vol"


def test_ip_accepts_brackets_once() -> None:
    assert values.ip("[fd00:0::1]") == "fd00::1"
    assert values.ip("fd00::1") == "fd00::1"
    for bad in ("[[fd00::1]]", "[10.0.0.1", "٣.٣.٣.٣", "host", 5):
        with pytest.raises(ValueError):
            values.ip(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:3260", Portal("127.0.0.1", 3260)),
        ("[fd00::1]:3261", Portal("fd00::1", 3261)),
        ("[fd00:0:0::1]:3261", Portal("fd00::1", 3261)),
    ],
)
def test_portal_parse_and_format(text: str, expected: Portal) -> None:
    portal = Portal.parse(text)
    assert portal == expected
    assert Portal.parse(str(portal)) == portal
    assert str(Portal("fd00::1", 3260)) == "[fd00::1]:3260"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fd00::1:3260",  # IPv6 without brackets
        "[fd00::1]3260",
        "[fd00::1",
        "[10.0.0.1]:3260",  # IPv4 in brackets
        "10.0.0.1",  # no port, no default
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:٣٢٦٠",
        "10.0.0.1:",
        "host:3260",  # a name where only IPs are allowed
        "[[fd00::1]]:3260",
    ],
)
def test_portal_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        Portal.parse(text)


def test_portal_default_port_and_names() -> None:
    assert Portal.parse("10.0.0.1", default_port=3260) == Portal("10.0.0.1", 3260)
    assert Portal.parse("[::1]", default_port=3260) == Portal("::1", 3260)
    assert Portal.parse("node-1:10809", names=True) == Portal("node-1", 10809)
    with pytest.raises(ValueError):
        Portal.parse("bad..name:1", names=True)


def test_ports() -> None:
    assert values.parse_port("3260") == 3260
    assert values.parse_port(1) == 1
    for bad in (True, 0, 65536, "٣", "1e3", " 1", 1.0, None):
        with pytest.raises(ValueError):
            values.parse_port(bad)
    assert values.port(3260) == 3260
    with pytest.raises(InvalidArgument, match="must be an integer 1-255"):
        values.port(256, "lun", 1, 255)
    with pytest.raises(InvalidArgument):
        values.port("3260")


def test_netns_names() -> None:
    assert values.netns("vmt-node1") == "vmt-node1"
    assert values.is_netns_name("a.b_c-1")
    for bad in ("", ".", "..", "-x", "a/b", "a b", "x" * 65, "ñ", None):
        assert not values.is_netns_name(bad)
        with pytest.raises(InvalidArgument, match="network namespace name"):
            values.netns(bad)
