"""Virtman's API boundary: names, portals, IQNs, LUNs and connection dicts."""

from __future__ import annotations

import pytest

from virtman import validation
from virtman.errors import InvalidInput

CONN = {"target_portal": "10.0.0.1:3260", "target_iqn": "iqn.2010-10.org.openstack:volume-a"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("10.0.0.1", "10.0.0.1"), ("[fd00::1]", "fd00::1"), ("fd00::0:1", "fd00::1"),
     ("Node-1.example", "node-1.example")],
)  # fmt: skip
def test_host_accepts_addresses_and_names(value: str, expected: str) -> None:
    assert validation.host(value, "h") == expected


@pytest.mark.parametrize(
    "value", ["", "[10.0.0.1", "::1]", "[[::1]]", "[10.0.0.1]", "a b", "x;y", "a/b", None, 5]
)
def test_host_rejects_the_rest(value: object) -> None:
    with pytest.raises(InvalidInput, match=r"^invalid h "):
        validation.host(value, "h")


def test_portal_is_canonical() -> None:
    assert validation.portal("[fd00::0:1]:03260") == "[fd00::1]:3260"
    for bad in [
        "10.0.0.1",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:\uff13\uff12\uff16\uff10",
        "10.0.0.1:-1",
    ]:
        with pytest.raises(InvalidInput, match="target_portal"):
            validation.portal(bad)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (1, 1), ("1", 1), ("255", 255)])
def test_lun_takes_ints_and_digit_strings(value: object, expected: int) -> None:
    assert validation.lun(value) == expected


@pytest.mark.parametrize("value", [1.9, "٣", True, "-1", 256, "1 ", "", None, [1]])
def test_lun_rejects_the_rest(value: object) -> None:
    with pytest.raises(InvalidInput, match=r"target_lun .*must be an integer 0-255"):
        validation.lun(value)


def test_connections_one_dict_or_a_list_of_the_same_iqn() -> None:
    (one,) = validation.connections(CONN)
    assert (one.portal, one.iqn, one.lun) == ("10.0.0.1:3260", CONN["target_iqn"], 1)
    two = validation.connections([CONN, dict(CONN, target_portal="10.0.0.2:3260")])
    assert [e.portal for e in two] == ["10.0.0.1:3260", "10.0.0.2:3260"]
    with pytest.raises(InvalidInput, match="same IQN"):
        validation.connections([CONN, dict(CONN, target_iqn="iqn.2010-10.org.openstack:volume-b")])
    with pytest.raises(InvalidInput, match="unknown keys"):
        validation.connections(dict(CONN, extra=1))
    with pytest.raises(InvalidInput, match="non-empty list"):
        validation.connections([])


@pytest.mark.parametrize("bad", ["a;b", "../x", "a b", "$(id)", "x/y", "", "a" * 65, "-rf", ".x"])
def test_names_reject_shell_and_path_characters(bad: str) -> None:
    with pytest.raises(InvalidInput, match="instance_name"):
        validation.name(bad, "instance_name")


def test_image_names_are_normalised() -> None:
    assert validation.image_name("image1") == "volume-image1"
    assert validation.image_name("volume-image1") == "volume-image1"
