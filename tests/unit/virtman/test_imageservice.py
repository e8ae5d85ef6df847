"""The export rules of create_image_target (image_dirs, image_block_devices), on a fake tgt."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from virtman.imageservice import ImageService
from virtman.journal import Journal
from virtman.layers.base import Revived


class FakeTgt:
    def __init__(self) -> None:
        self.created: list[tuple[str, Path]] = []

    def targets(self) -> list[Any]:
        return [
            SimpleNamespace(iqn=iqn, tid=i + 1, luns=[SimpleNamespace(backing_path=str(p))])
            for i, (iqn, p) in enumerate(self.created)
        ]

    def create_target(self, iqn: str, path: Path, **_: Any) -> int:
        self.created.append((iqn, path))
        return len(self.created)

    def delete_target(self, iqn: str) -> None:
        self.created = [(i, p) for i, p in self.created if i != iqn]


@pytest.fixture
def dirs(tmp_path: Path) -> SimpleNamespace:
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    (images / "good.raw").write_bytes(b"\0" * 4096)
    (images / "odd.raw").write_bytes(b"\0" * 1000)
    (outside / "secret.raw").write_bytes(b"s" * 4096)
    (images / "out-link").symlink_to(outside / "secret.raw")
    (images / "in-link").symlink_to(images / "good.raw")
    (images / "sub").mkdir()
    os.mkfifo(images / "fifo")
    return SimpleNamespace(images=images, outside=outside)


def service(dirs: SimpleNamespace, **kwargs: Any) -> tuple[ImageService, FakeTgt]:
    tgt = FakeTgt()
    return ImageService(tgt, None, "iqn.2010-10.org.openstack:", [dirs.images], **kwargs), tgt  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "rule"),
    [
        ("{outside}/secret.raw", "{outside}/secret.raw is outside image_dirs ({images})"),
        ("{images}/../outside/secret.raw", "is outside image_dirs ({images})"),
        ("{images}/sub/../../outside/secret.raw", "is outside image_dirs"),
        ("{images}/out-link", "{images}/out-link is outside image_dirs"),
        ("{images}", "is outside image_dirs"),  # the directory itself
        ("{outside}/missing.raw", "is outside image_dirs"),  # existence is not revealed
        ("{images}/sub", "{images}/sub is not a regular file"),
        ("{images}/fifo", "is not a regular file"),
        ("/dev/null", "is outside image_dirs"),
    ],
)
def test_refused_paths_create_nothing(dirs: SimpleNamespace, given: str, rule: str) -> None:
    images, tgt = service(dirs)
    path = given.format(**vars(dirs))
    answer = images.create_image_target("leak", path)
    assert answer.startswith("2:ImageService: ")
    assert rule.format(**vars(dirs)) in answer
    assert tgt.created == []


def test_allowed_files_are_exported_by_their_real_path(dirs: SimpleNamespace) -> None:
    images, tgt = service(dirs)
    good = dirs.images / "good.raw"
    assert images.create_image_target("a", str(dirs.images / "sub/../good.raw")) == f"0:1:{good}"
    assert images.create_image_target("b", str(dirs.images / "in-link")) == f"0:2:{good}"
    assert [p for _, p in tgt.created] == [good, good]
    assert images.create_image_target("c", str(dirs.images / "missing.raw")).startswith(
        "2:ImageService: the file"
    )
    assert "multiple of 512" in images.create_image_target("d", str(dirs.images / "odd.raw"))
    assert images.create_image_target("e", "relative.raw").startswith("2:invalid file_path")


def test_block_devices_only_when_listed(dirs: SimpleNamespace) -> None:
    block = next((d for d in ("/dev/loop0", "/dev/ram0", "/dev/sda") if Path(d).exists()), None)
    if block is None or not Path(block).is_block_device():
        pytest.fail("no block device node to test with (/dev/loop0 is made by losetup)")
    images, tgt = service(dirs)
    assert f"{block} is a block device not in image_block_devices" in (
        images.create_image_target("dev", block)
    )
    (dirs.images / "dev-link").symlink_to(block)
    assert "is a block device not in image_block_devices" in images.create_image_target(
        "dev", str(dirs.images / "dev-link")
    )
    assert tgt.created == []
    listed, tgt = service(dirs, block_devices=[block])
    assert listed.create_image_target("dev", block) == f"0:1:{os.path.realpath(block)}"


def journaled(dirs: SimpleNamespace, tmp_path: Path) -> tuple[ImageService, FakeTgt, Journal]:
    journal = Journal(tmp_path / "state" / "journal.json")
    images, tgt = service(dirs, journal=journal)
    return images, tgt, journal


def test_image_targets_are_recorded_and_exported_again_when_tgtd_lost_them(
    dirs: SimpleNamespace, tmp_path: Path
) -> None:
    images, tgt, journal = journaled(dirs, tmp_path)
    good = dirs.images / "good.raw"
    assert images.create_image_target("a", str(good)) == f"0:1:{good}"
    iqn = "iqn.2010-10.org.openstack:volume-a"
    assert Journal(journal.path).exports() == {"volume-a": {"iqn": iqn, "path": str(good)}}
    assert images.restore(Revived(stacks=True)) == 0  # tgtd did not die
    tgt.created.clear()  # tgtd died with the target
    assert images.restore(Revived(targets=True)) == 1
    assert tgt.created == [(iqn, good)]
    assert images.restore() == 0  # present: nothing twice
    assert images.destroy_image_target("a") == "0:"
    assert journal.exports() == {} and tgt.created == []


def test_a_record_whose_file_went_away_is_not_exported_until_destroyed(
    dirs: SimpleNamespace, tmp_path: Path
) -> None:
    images, tgt, journal = journaled(dirs, tmp_path)
    spare = dirs.images / "spare.raw"
    spare.write_bytes(bytes(4096))
    images.create_image_target("a", str(spare))
    tgt.created.clear()
    spare.unlink()
    assert images.restore(Revived(targets=True)) == 0 and tgt.created == []
    assert list(journal.exports()) == ["volume-a"]  # kept: the file may come back
    answer = images.destroy_image_target("a")
    assert answer == "1:ImageService: the image target 'volume-a' does not exist!"
    assert journal.exports() == {}


def test_targets_exported_before_records_are_recorded_at_start(
    dirs: SimpleNamespace, tmp_path: Path
) -> None:
    images, tgt, journal = journaled(dirs, tmp_path)
    good = dirs.images / "good.raw"
    tgt.created = [
        ("iqn.2010-10.org.openstack:volume-old", good),
        ("iqn.2010-10.org.openstack:volume-relay", Path("/run/virtman/exports/x.raw")),
        ("iqn.2010-10.org.openstack:volume-secret", dirs.outside / "secret.raw"),
    ]
    assert images.restore() == 0
    assert journal.exports() == {
        "volume-old": {"iqn": "iqn.2010-10.org.openstack:volume-old", "path": str(good)}
    }
