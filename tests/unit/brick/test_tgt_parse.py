"""brick.tgt without a daemon: the ``tgtadm --op show`` parsers on output captured from tgt
1.0.85, and argument validation (which must refuse before any command runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from brick import tgt
from brick.exception import InvalidArgument
from brick.tgt import Chap, TgtAdm, TgtDaemon, validate_iqn, validate_portal
from brick.tgt.parse import (
    Connection,
    Lun,
    ParseError,
    parse_accounts,
    parse_targets,
    validate_backing_path,
    validate_control_port,
    validate_initiator,
    validate_lun,
    validate_netns,
)

DATA = Path(__file__).parent / "data"


def read(name: str) -> str:
    return (DATA / name).read_text()


# -- parsers ---------------------------------------------------------------------------------
def test_parse_targets_with_connections_readonly_luns_chap_and_acls() -> None:
    targets = parse_targets(read("tgt_show_target_connected.txt"))

    assert [(t.tid, t.iqn) for t in targets] == [
        (1, "iqn.2010-10.org.openstack:volume-image1"),
        (2, "iqn.2010-10.org.openstack:volume-rw"),
        (7, "iqn.2024-01.org.example.host:empty"),
    ]
    image, rw, empty = targets

    assert image.luns == (Lun(1, "/tmp/tgtcap/img-a.raw", size_mb=4, readonly=True),)
    assert image.connections == (
        Connection("iqn.2008-11.org.linux-kvm", "127.0.0.1", nexus=2),
        Connection("iqn.2008-11.org.linux-kvm", "127.0.0.1", nexus=3),
    )
    assert image.accounts == ("vmt.relay",)
    assert image.outgoing_accounts == ()
    assert image.acl == ("ALL",)

    assert rw.luns == (
        Lun(1, "/tmp/tgtcap/img-b.raw", size_mb=4, readonly=False),
        Lun(2, "/tmp/tgtcap/img-c.raw", size_mb=3, readonly=True),
    )
    assert rw.lun(2) == rw.luns[1]
    assert rw.lun(3) is None
    assert rw.connections == (Connection("iqn.2008-11.org.linux-kvm", "127.0.0.1", nexus=1),)
    assert rw.accounts == ()
    assert rw.acl == ("127.0.0.1", "127.0.0.0/8", "::1")

    # only tgtd's LUN 0 controller: no data LUN, no ACL, one incoming + one outgoing account
    assert empty.luns == ()
    assert empty.connections == ()
    assert empty.accounts == ("vmt.relay",)
    assert empty.outgoing_accounts == ("out.user",)
    assert empty.acl == ()


def test_parse_targets_of_an_idle_daemon_is_empty() -> None:
    assert read("tgt_show_target_none.txt") == ""
    assert parse_targets(read("tgt_show_target_none.txt")) == []


def test_parse_accounts() -> None:
    assert parse_accounts(read("tgt_show_account.txt")) == ["out.user", "vmt.relay"]
    assert parse_accounts("") == []


def test_parse_keeps_paths_with_colons() -> None:
    text = read("tgt_show_target_connected.txt").replace(
        "/tmp/tgtcap/img-a.raw", "/srv/images/a:b c.raw"
    )
    assert parse_targets(text)[0].luns[0].backing_path == "/srv/images/a:b c.raw"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("tgtadm: invalid request\n", "expected 'Target N: iqn'"),
        ("    LUN information:\n", "text before the first target"),
        ("Target 1: iqn.2024-01.org.example:a\n    Mystery section:\n", "unknown section"),
        (
            "Target 1: iqn.2024-01.org.example:a\n    I_T nexus information:\n"
            "            Connection: 0\n",
            "outside an I_T nexus",
        ),
        (
            "Target 1: iqn.2024-01.org.example:a\n    LUN information:\n"
            "        LUN: 1\n            Type: disk\n",
            "incomplete LUN",
        ),
    ],
)
def test_parse_refuses_what_it_does_not_understand(text: str, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        parse_targets(text)


def test_parse_refuses_an_unexpected_size_unit() -> None:
    text = read("tgt_show_target_connected.txt").replace("Size: 4 MB", "Size: 4 GB", 1)
    with pytest.raises(ParseError, match="unexpected LUN size"):
        parse_targets(text)


# -- validation ------------------------------------------------------------------------------
@pytest.fixture
def no_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any command run through brick.tgt fails the test: validation must come first."""

    def refuse(argv: object, **_: object) -> None:
        raise AssertionError(f"a command ran before validation finished: {argv}")

    monkeypatch.setattr(tgt.adm, "execute", refuse)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image.raw"
    path.write_bytes(b"\0" * 4096)
    return path


@pytest.mark.parametrize(
    "iqn",
    [
        "iqn.2010-10.org.openstack:volume-image1",
        "iqn.2024-01.org.example",
        "iqn.2024-12.com.example.host-1:a.b_c:d-e",
        "iqn.2024-01.org.example:" + "x" * (223 - len("iqn.2024-01.org.example:")),
    ],
)
def test_valid_iqns(iqn: str) -> None:
    assert validate_iqn(iqn) == iqn


@pytest.mark.parametrize(
    "iqn",
    [
        "",
        "eui.02004567A425678D",
        "iqn.2024-13.org.example:a",
        "iqn.24-01.org.example:a",
        "iqn.2024-01.:a",
        "iqn.2024-01.org..example:a",
        "iqn.2024-01.org.example-:a",
        "iqn.2024-01.org.example:",
        "iqn.2024-01.org.example:a b",
        "iqn.2024-01.org.example:a/b",
        "iqn.2024-01.org.example:a\n",
        "iqn.2024-01.org.example:" + "x" * (224 - len("iqn.2024-01.org.example:")),
        None,
        42,
    ],
)
def test_invalid_iqns(iqn: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_iqn(iqn)
    assert err.value.field == "iqn"


def test_backing_path_validation(tmp_path: Path, image: Path) -> None:
    assert validate_backing_path(image) == str(image)
    assert validate_backing_path(f"{tmp_path}/./image.raw") == str(image)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad, rule in [
        ("image.raw", "absolute"),
        (str(tmp_path / "missing.raw"), "does not exist"),
        (str(tmp_path), "regular file or a block device"),
        (str(fifo), "regular file or a block device"),
        ("/dev/null", "regular file or a block device"),
        (f"{image}\n", "control characters"),
        (None, "path"),
    ]:
        with pytest.raises(InvalidArgument, match=rule) as err:
            validate_backing_path(bad)
        assert err.value.field == "backing_path"


@pytest.mark.parametrize(
    ("portal", "canonical"),
    [
        ("127.0.0.1:3260", "127.0.0.1:3260"),
        ("0.0.0.0:3260", "0.0.0.0:3260"),
        ("[::1]:3260", "[::1]:3260"),
        ("[0:0::1]:03260", "[::1]:3260"),
    ],
)
def test_valid_portals(portal: str, canonical: str) -> None:
    assert validate_portal(portal) == canonical


@pytest.mark.parametrize(
    "portal",
    [
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:port",
        "::1:3260",  # tgtd would ignore it and listen on 0.0.0.0:3260
        "[127.0.0.1]:3260",
        "localhost:3260",
        "",
        None,
    ],
)
def test_invalid_portals(portal: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_portal(portal)
    assert err.value.field == "portal"


def test_lun_control_port_initiator_and_netns_validation() -> None:
    assert validate_lun(1) == 1 and validate_lun(255) == 255
    bad: object
    for bad in (0, 256, -1, True, "1", 1.0):
        with pytest.raises(InvalidArgument, match="lun"):
            validate_lun(bad)
    assert validate_control_port(0) == 0 and validate_control_port(65535) == 65535
    for bad in (-1, 65536, "3260", None, False):
        with pytest.raises(InvalidArgument, match="control_port"):
            validate_control_port(bad)
    assert validate_initiator("ALL") == "ALL"
    assert validate_initiator("127.0.0.1") == "127.0.0.1"
    assert validate_initiator("127.0.0.0/8") == "127.0.0.0/8"
    assert validate_initiator("0::1") == "::1"
    for bad in ("all", "127.0.0.1/8", "host.example", "", None):
        with pytest.raises(InvalidArgument, match="initiators"):
            validate_initiator(bad)
    assert validate_netns("vmt-node1") == "vmt-node1"
    for bad in ("", "..", "a/b", "-x", "x" * 65):
        with pytest.raises(InvalidArgument, match="netns"):
            validate_netns(bad)


def test_chap_validation_and_masking() -> None:
    chap = Chap("vmt.relay", "s3cret-pass-123")
    assert "s3cret" not in repr(chap) and "s3cret" not in str(chap)
    assert repr(chap) == "Chap(user='vmt.relay', password='***')"
    argv = ["tgtadm", "--op", "new", "--user", "vmt.relay", "--password", chap.password]
    assert tgt.adm._masked(argv) == [*argv[:-1], "***"]  # what a CommandFailed keeps
    for user in ("", "a b", "x" * 65, "ü"):
        with pytest.raises(InvalidArgument, match=r"chap\.user"):
            Chap(user, "s3cret-pass-123")
    for password in (
        "short-pass1",
        "with space 123",
        "x" * 65,
        "tab\tpassword12",
        "pässwordpässword",
    ):
        with pytest.raises(InvalidArgument, match=r"chap\.password") as err:
            Chap("vmt.relay", password)
        assert password not in str(err.value)


def test_create_target_validates_before_any_command(no_commands: None, image: Path) -> None:
    adm = TgtAdm(4000)
    iqn = "iqn.2024-01.org.example:a"
    cases: list[tuple[dict[str, object], str]] = [
        ({"iqn": "nope"}, "iqn"),
        ({"backing_path": "relative.raw"}, "backing_path"),
        ({"lun": 0}, "lun"),
        ({"readonly": "yes"}, "readonly"),
        ({"initiators": "ALL"}, "initiators"),
        ({"initiators": []}, "initiators"),
        ({"initiators": ["ALL", "127.0.0.1"]}, "initiators"),
        ({"initiators": ["10.0.0.300"]}, "initiators"),
        ({"chap": ("user", "password")}, "chap"),
    ]
    for change, field in cases:
        args: dict[str, object] = {"iqn": iqn, "backing_path": image} | change
        with pytest.raises(InvalidArgument) as err:
            adm.create_target(args.pop("iqn"), args.pop("backing_path"), **args)  # type: ignore[arg-type]
        assert err.value.field == field, change
    for call in (adm.delete_target, adm.find, adm.connections):
        with pytest.raises(InvalidArgument, match="iqn"):
            call("iqn.bad")
    with pytest.raises(InvalidArgument, match="control_port"):
        TgtAdm(70000)


def test_daemon_validates_its_arguments(tmp_path: Path) -> None:
    for portals, field in [
        ("127.0.0.1:3260", "portals"),
        ([], "portals"),
        (["::1:3260"], "portals"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            TgtDaemon(4000, portals, run_dir=tmp_path)  # type: ignore[arg-type]
        assert err.value.field == field
    with pytest.raises(InvalidArgument, match="control_port"):
        TgtDaemon(-1, ["127.0.0.1:3260"], run_dir=tmp_path)
    with pytest.raises(InvalidArgument, match="netns"):
        TgtDaemon(4000, ["127.0.0.1:3260"], run_dir=tmp_path, netns="../etc")
    daemon = TgtDaemon(4000, ["127.0.0.1:3260", "[::1]:3261"], run_dir=tmp_path, netns="n1")
    assert daemon.argv() == [
        "nsenter",
        "--net=/var/run/netns/n1",
        "tgtd",
        "-f",
        "-C",
        "4000",
        "--iscsi",
        "portal=127.0.0.1:3260,portal=[::1]:3261",
    ]
    assert daemon.pidfile == tmp_path / "tgtd-4000.pid"
    assert daemon.logfile == tmp_path / "tgtd-4000.log"
