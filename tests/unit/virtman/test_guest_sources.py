"""Where a guest's deploy reads its image: its own export first, else the image servers."""

from __future__ import annotations

from typing import Any

import pytest

from brick.values import Portal
from virtman.errors import InvalidInput
from virtman.guest.sources import image_source, parse_image_servers

PREFIX = "iqn.2010-10.org.openstack:"
LOCAL = Portal("10.0.0.5", 3260)
EXPORTS: dict[str, Any] = {"volume-mine": {"iqn": f"{PREFIX}volume-mine", "tid": 3}}


def test_an_image_this_node_exports_is_read_locally_even_with_image_servers() -> None:
    source = image_source(lambda: EXPORTS, LOCAL, parse_image_servers(["10.0.0.9"]), PREFIX)
    assert source("volume-mine") == {
        "target_portal": "10.0.0.5:3260",
        "target_iqn": f"{PREFIX}volume-mine",
        "target_lun": 1,
    }


def test_another_image_is_read_from_each_image_server() -> None:
    one = image_source(lambda: EXPORTS, LOCAL, parse_image_servers(["10.0.0.9"]), PREFIX)
    assert one("volume-image1") == {
        "target_portal": "10.0.0.9:3260",
        "target_iqn": f"{PREFIX}volume-image1",
        "target_lun": 1,
    }
    servers = parse_image_servers(["10.0.0.9:3261", "[fd00::9]", "img.example"])
    two = image_source(dict, LOCAL, servers, PREFIX)
    assert [p["target_portal"] for p in two("volume-image1")] == [
        "10.0.0.9:3261",
        "[fd00::9]:3260",
        "img.example:3260",
    ]


def test_without_image_servers_only_local_exports_deploy() -> None:
    source = image_source(lambda: EXPORTS, LOCAL, [], PREFIX)
    with pytest.raises(InvalidInput, match="not exported by this node"):
        source("volume-image1")


def test_the_export_record_is_read_at_each_deploy() -> None:
    """An image exported after start (z/VM image_import) is read locally from then on."""
    exports: dict[str, Any] = {}
    source = image_source(lambda: exports, LOCAL, parse_image_servers(["10.0.0.9"]), PREFIX)
    assert source("volume-late")["target_portal"] == "10.0.0.9:3260"
    exports["volume-late"] = {"iqn": f"{PREFIX}volume-late"}
    assert source("volume-late")["target_portal"] == "10.0.0.5:3260"


@pytest.mark.parametrize("bad", ["", "fd00::9", "10.0.0.9:0", "10.0.0.9:x", "[10.0.0.9]"])
def test_a_bad_image_server_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^guest_image_servers: "):
        parse_image_servers(["10.0.0.9", bad])
