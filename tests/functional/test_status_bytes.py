"""Issue 13, Build 6: bytes per source on the status page's data, from real nodes.

A LocalCluster (qemu driver, namespaces) of an image server and 3 nodes under a volt-api with
the cluster controller: one VM per node, every disk read through once. The nodes' heartbeats
carry their per-path read counters; ``GET /v1/status`` then shows, per node, about one image
read over its sources, and, per image, the image server's share no larger than what the image
server's link really sent.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.functional.clusterfixtures import IMAGE, disk_matches, write_image

pytestmark = pytest.mark.functional

SIZE_MIB = 32
STATUS_SNIPPET = (  # argv: url token
    "import json, sys, urllib.request\n"
    "url, token = sys.argv[1:3]\n"
    "req = urllib.request.Request(url + '/v1/status', headers={'X-Auth-Token': token})\n"
    "print(urllib.request.urlopen(req, timeout=30).read().decode())\n"
)


def status(cluster: Any) -> dict[str, Any]:
    url = f"http://{cluster.hosts['volt'].address}:7447"
    argv = [sys.executable, "-c", STATUS_SNIPPET, url, cluster.token]
    out = cluster.hosts["ctl"].run(argv).stdout
    answer: dict[str, Any] = json.loads(out)
    return answer


def test_each_node_reports_one_image_read_over_its_sources(cluster_factory) -> None:
    cluster = cluster_factory(3, controller=True, heartbeat_interval=1)
    image_file = cluster.workdir / "image1.raw"
    write_image(image_file, SIZE_MIB)
    size = SIZE_MIB << 20
    sent_before = cluster.tx_bytes("img")
    assert cluster.rpc("img", "create_image_target", "image1", str(image_file), None, None) == (
        f"0:1:{image_file}"
    )
    disks = []
    for node in cluster.node_names:  # one after another: a tree of depth 2
        code, _, disk = cluster.rpc(node, "create", f"vm-{node}", "image1",
                                    cluster.connection(IMAGE)).partition(":")  # fmt: skip
        assert code == "0", disk
        disks.append(disk)
    for disk in disks:
        assert disk_matches(disk, image_file)
    image_server_sent = cluster.tx_bytes("img") - sent_before

    def settled() -> dict[str, Any] | None:
        (image,) = [i for i in status(cluster)["images"] if i["id"] == IMAGE]
        nodes = image["nodes"]
        if len(nodes) != 3 or any(
            n["bytes_read"] is None or sum(r["bytes"] for r in n["bytes_read"]) < size
            for n in nodes
        ):
            return None
        return image

    cluster.wait_for(lambda: settled() is not None, "every node to report one image read", 30)
    image = settled()
    assert image is not None
    per_node = {n["host"]: n["bytes_read"] for n in image["nodes"]}
    totals = image["bytes_read"]
    print(f"\nimage {size} bytes; per node {json.dumps(per_node)}; totals {totals}; "
          f"image server link sent {image_server_sent}")  # fmt: skip
    for host, reads in per_node.items():
        read = sum(r["bytes"] for r in reads)
        assert size <= read <= size * 1.05, (host, reads)  # one image, plus protocol headers
    assert totals["nodes_reporting"] == 3
    assert totals["peers"] > 0  # the deepest node read from its parent
    assert totals["image_server"] >= 2 * size  # the two nodes at depth 1
    assert totals["image_server"] <= image_server_sent  # never more than the link sent
