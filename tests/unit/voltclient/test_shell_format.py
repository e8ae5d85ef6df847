"""Pure formatting of the ``volt`` command (no server)."""

from __future__ import annotations

from typing import Any

import pytest

from voltclient.client import Volume
from voltclient.shell import (
    describe_node,
    format_address,
    format_members,
    format_table,
    format_tree,
    format_volumes,
)


def node(
    peer_id: str,
    parent: str | None,
    parents: list[str],
    *,
    status: str = "OK",
    port: str | None = "3260",
    host: str | None = None,
) -> dict[str, Any]:
    return {
        "host": host or peer_id.rpartition(":")[0],
        "port": port,
        "iqn": "iqn.2010-10.org.test:img" if port else None,
        "lun": "1" if port else None,
        "status": status,
        "peer_id": peer_id,
        "parent": parent,
        "depth": 0,  # not used by the formatting
        "parents": parents,
        "extra": "ignored",
    }


def test_table_aligns_columns_and_strips_trailing_blanks() -> None:
    assert format_table(("A", "LONG HEADER", "C"), [("xyz", 1, ""), ("q", None, "end")]) == [
        "A    LONG HEADER  C",
        "xyz  1",
        "q                 end",
    ]


def test_table_without_rows_is_the_header() -> None:
    assert format_table(("ID", "COUNT"), []) == ["ID  COUNT"]


def test_volumes_table() -> None:
    assert format_volumes([{"id": "img1", "count": 12}, {"id": "volume-0002", "count": 0}]) == [
        "ID           COUNT",
        "img1         12",
        "volume-0002  0",
    ]


def test_members_table() -> None:
    members = [
        {"host": "10.0.0.1", "seconds_since_heartbeat": 0.04, "peer_ids": ["10.0.0.1:a"]},
        {
            "host": "fd00::2",
            "seconds_since_heartbeat": 12.345,
            "peer_ids": ["[fd00::2]:a", "[fd00::2]:b"],
        },
        {"host": "h3", "seconds_since_heartbeat": 3, "peer_ids": []},
    ]
    assert format_members(members) == [
        "HOST      SECONDS SINCE HEARTBEAT  NODES",
        "10.0.0.1  0.0                      10.0.0.1:a",
        "fd00::2   12.3                     [fd00::2]:a, [fd00::2]:b",
        "h3        3.0                      -",
    ]


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("10.0.0.1", "3260", "10.0.0.1:3260"),
        ("fd00::5", "3260", "[fd00::5]:3260"),
        ("node-7.example.org", 3261, "node-7.example.org:3261"),
        ("10.0.0.1", None, None),
        ("10.0.0.1", "", None),
        (None, "3260", None),
    ],
)
def test_address(host: str | None, port: str | int | None, expected: str | None) -> None:
    assert format_address(host, port) == expected


def test_node_under_the_image_server() -> None:
    assert describe_node(node("10.0.0.1:img", None, [])) == "10.0.0.1:img  OK  10.0.0.1:3260"


def test_pending_node_without_address() -> None:
    n = node("10.0.0.4:img", "10.0.0.1:img", ["10.0.0.1:img"], status="pending", port=None)
    assert describe_node(n) == "10.0.0.4:img  pending"


def test_node_with_standby_parents() -> None:
    n = node("10.0.0.3:img", "10.0.0.1:img", ["10.0.0.1:img", "10.0.0.2:img", "10.0.0.9:img"])
    assert describe_node(n) == (
        "10.0.0.3:img  OK  10.0.0.3:3260  standby: 10.0.0.2:img, 10.0.0.9:img"
    )


def test_node_reading_from_another_node_than_its_tree_parent() -> None:
    n = node("10.0.0.3:img", "10.0.0.1:img", ["10.0.0.2:img", "10.0.0.9:img"])
    assert describe_node(n) == (
        "10.0.0.3:img  OK  10.0.0.3:3260  reads from: 10.0.0.2:img  standby: 10.0.0.9:img"
    )


def test_node_reading_from_the_image_server_below_pending_ancestors() -> None:
    n = node("10.0.0.3:img", "10.0.0.1:img", [], host="192.168.0.3")
    assert describe_node(n) == "10.0.0.3:img  OK  192.168.0.3:3260  reads from: image server"


def test_empty_tree() -> None:
    assert format_tree("img", []) == ["image server (img, 0 nodes)"]


def test_one_node_tree() -> None:
    assert format_tree("img", [node("10.0.0.1:img", None, [])]) == [
        "image server (img, 1 node)",
        "`-- 10.0.0.1:img  OK  10.0.0.1:3260",
    ]


def test_tree_nests_breadth_first_listing() -> None:
    a, b, c, d, e, f = (f"10.0.0.{i}:img" for i in range(1, 7))
    nodes = [  # breadth first, as GET /v1/volumes/<id> lists them
        node(a, None, []),
        node(b, None, []),
        node(c, a, [a, b]),
        node(d, a, [a, b], status="pending", port=None),
        node(e, b, [b, a]),
        node(f, c, [c, d, a]),
    ]
    assert format_tree("img", nodes) == [
        "image server (img, 6 nodes)",
        "|-- 10.0.0.1:img  OK  10.0.0.1:3260",
        "|   |-- 10.0.0.3:img  OK  10.0.0.3:3260  standby: 10.0.0.2:img",
        "|   |   `-- 10.0.0.6:img  OK  10.0.0.6:3260  standby: 10.0.0.4:img, 10.0.0.1:img",
        "|   `-- 10.0.0.4:img  pending  standby: 10.0.0.2:img",
        "`-- 10.0.0.2:img  OK  10.0.0.2:3260",
        "    `-- 10.0.0.5:img  OK  10.0.0.5:3260  standby: 10.0.0.1:img",
    ]


def test_deep_chain_does_not_recurse() -> None:
    ids = [f"10.0.{i // 250}.{i % 250 + 1}:img" for i in range(3000)]
    nodes = [node(p, ids[i - 1] if i else None, []) for i, p in enumerate(ids)]
    lines = format_tree("img", nodes)
    assert len(lines) == 3001
    assert (
        lines[-1]
        == " " * 4 * 2999 + "`-- 10.0.11.250:img  OK  10.0.11.250:3260  reads from: image server"
    )


def test_volume_from_dict_ignores_unknown_keys() -> None:
    v = Volume.from_dict(node("10.0.0.1:img", None, []))
    assert v == Volume("10.0.0.1", "3260", "iqn.2010-10.org.test:img", "1", "OK", "10.0.0.1:img")
    assert v.ready
    assert v.to_dict() == {
        "host": "10.0.0.1",
        "port": "3260",
        "iqn": "iqn.2010-10.org.test:img",
        "lun": "1",
        "status": "OK",
        "peer_id": "10.0.0.1:img",
    }
    assert Volume.from_dict({"peer_id": None}) == Volume()
    assert not Volume().ready
