"""A real local cluster for functional tests: volt-api, an image server and compute nodes,
each a virtmanserver with the ``qemu`` driver in its own network namespace.

The harness itself is ``vmt-demo/cluster.py`` (the demo and the benchmarks use it too).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from brick.executor import execute
from brick.netns import Lab

sys.path.insert(0, str(Path(__file__).parents[2] / "vmt-demo"))

from cluster import LocalCluster

IMAGE = "volume-image1"
# Distinct from the demo's and the benchmarks' defaults, so that they can run meanwhile.
# VMT_TEST_LAB / VMT_TEST_TGT_BASE let two checkouts run their cluster tests at once.
LAB = os.environ.get("VMT_TEST_LAB", "vmtf")
SUBNET = "10.232.0.0/24"
TGT_BASE = int(os.environ.get("VMT_TEST_TGT_BASE", "3400"))
LAB_STATE = Path("/run/vmt-test-labs")  # fixed: a killed run's lab is removed by the next


def write_image(path: Path, size_mib: int) -> str:
    """A file of random bytes; returns its sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size_mib):
            block = os.urandom(1 << 20)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def export_image(cluster: LocalCluster, size_mib: int, name: str = "image1") -> Path:
    """Write a random image file of ``size_mib`` MiB and export it from the image server."""
    image_file = cluster.workdir / f"{name}.raw"
    write_image(image_file, size_mib)
    result = cluster.rpc("img", "create_image_target", name, str(image_file))
    assert result.startswith("0:"), result
    return image_file


def create_vm(cluster: LocalCluster, node: str, vm: str, image: str = "image1") -> str:
    """Create instance ``vm`` of ``image`` on ``node``; its disk's path."""
    result = cluster.rpc(node, "create", vm, image, cluster.connection(f"volume-{image}"))
    assert result.startswith("0:"), result
    return str(result[2:])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def disk_matches(overlay: str, image: Path) -> bool:
    """Whether a VM's disk (a qcow2 overlay, read through its whole backing chain) holds
    exactly the image's bytes. Reads from the root namespace go through the node's FUSE
    export, served by the node's qemu-storage-daemon: local I/O, no packet leaves here."""
    result = execute(
        ["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", overlay, str(image)],
        check_exit_code=(0, 1),
        timeout_s=300,
    )
    return result.exit_code == 0


def qemu_io(disk: str, command: str, *, fmt: str = "qcow2", read_only: bool = False) -> str:
    argv = ["qemu-io", "-f", fmt, "-c", command]
    if read_only:
        argv[1:1] = ["-r", "-U"]
    return execute([*argv, disk], timeout_s=300).stdout


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator:
    """``cluster_factory(nodes, **options)`` starts a LocalCluster; every one is torn down."""
    made: list[LocalCluster] = []

    def make(nodes: int, **options: object) -> LocalCluster:
        Lab.cleanup(LAB, LAB_STATE)
        cluster = LocalCluster(
            tmp_path / f"cluster{len(made)}",
            nodes,
            name=LAB,
            subnet=SUBNET,
            tgt_control_base=TGT_BASE,
            lab_state_dir=LAB_STATE,
            **options,  # type: ignore[arg-type]
        )
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.close()
