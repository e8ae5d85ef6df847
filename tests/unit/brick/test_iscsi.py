"""brick.iscsi without a kernel: parsers on ``iscsiadm`` output captured in a QEMU guest
(open-iscsi 2.1.8, Debian 6.1 kernel), validation, and the argv of every step of connect and
disconnect through an injected fake ``execute`` (udev links and sysfs in a temporary tree)."""

from __future__ import annotations

from pathlib import Path

import pytest

from brick import iscsi
from brick.exception import CommandFailed, InvalidArgument, Timeout
from brick.iscsi import (
    Chap,
    DiscoveredTarget,
    ISCSIConnector,
    ParseError,
    Session,
    parse_discovery,
    parse_node_record,
    parse_sessions,
)
from tests.unit.fakes.execute import FakeExecute

IQN = "iqn.2010-10.org.openstack:volume-cap"
P0, P1, P6 = "10.99.0.2:3260", "10.99.1.2:3260", "[fd00:99::2]:3260"
SECRET = "sekret123456-x"

# -- real output -----------------------------------------------------------------------------
SESSIONS = """\
tcp: [1] 10.99.0.2:3260,1 iqn.2010-10.org.openstack:volume-cap (non-flash)
tcp: [2] 10.99.1.2:3260,1 iqn.2010-10.org.openstack:volume-cap (non-flash)
tcp: [3] [fd00:99::2]:3260,1 iqn.2010-10.org.openstack:volume-cap (non-flash)
"""
NO_SESSIONS = "iscsiadm: No active sessions.\n"  # stderr, exit 21
NO_RECORDS = "iscsiadm: No records found\n"  # stderr, exit 21
DISCOVERY = "10.99.0.2:3260,1 iqn.2010-10.org.openstack:volume-cap\n"
LOGIN_EXISTS = (
    "iscsiadm: default: 1 session requested, but 1 already present.\n"
    "iscsiadm: Could not log into all portals\n"
)  # exit 15
NODE_RECORD = """\
# BEGIN RECORD 2.1.8
node.name = iqn.2010-10.org.openstack:volume-cap
node.tpgt = -1
node.startup = manual
iface.iscsi_ifacename = default
iface.net_ifacename = <empty>
node.session.auth.authmethod = CHAP
node.session.auth.username = user1
node.session.auth.password = ********
node.session.auth.username_in = <empty>
node.session.timeo.replacement_timeout = 5
node.conn[0].address = 10.99.1.2
node.conn[0].port = 3260
# END RECORD
"""


def test_parse_sessions() -> None:
    assert parse_sessions(SESSIONS) == [
        Session("tcp", 1, P0, 1, IQN),
        Session("tcp", 2, P1, 1, IQN),
        Session("tcp", 3, P6, 1, IQN),
    ]
    assert parse_sessions("") == []
    assert parse_sessions(NO_SESSIONS) == []
    flash = "tcp: [4] [fd00:0099:0::2]:3260,1 iqn.2024-01.org.example:a (flash)\n"
    (session,) = parse_sessions(flash)
    assert session.flash and session.portal == P6  # canonical IPv6


def test_parse_discovery_and_node_list() -> None:
    assert parse_discovery(DISCOVERY) == [DiscoveredTarget(P0, 1, IQN)]
    assert parse_discovery("[fd00:99::2]:3260,-1 " + IQN + "\n") == [DiscoveredTarget(P6, -1, IQN)]
    assert parse_discovery(NO_RECORDS) == []


def test_parse_node_record() -> None:
    record = parse_node_record(NODE_RECORD)
    assert record["node.name"] == IQN
    assert record["node.session.auth.password"] == "********"
    assert record["iface.net_ifacename"] == ""
    assert record["node.conn[0].port"] == "3260"


@pytest.mark.parametrize(
    ("parse", "text", "why"),
    [
        (parse_sessions, "tcp [1] 10.0.0.1:3260,1 iqn.x\n", "expected 'tcp: \\[sid\\]"),
        (parse_sessions, "tcp: [1] host:3260,1 iqn.2024-01.org.a:b\n", "bad portal 'host:3260'"),
        (parse_discovery, "10.0.0.1:3260 iqn.2024-01.org.a:b\n", "expected 'portal,tpgt iqn'"),
        (parse_node_record, "node.name: x\n", "expected 'key = value'"),
    ],
)
def test_parsers_refuse_what_they_do_not_understand(parse, text: str, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ParseError, match=why):
        parse(text)


def test_by_path_names_as_udev_writes_them() -> None:
    assert iscsi.by_path(P0, IQN, 1) == (
        "/dev/disk/by-path/ip-10.99.0.2:3260-iscsi-iqn.2010-10.org.openstack:volume-cap-lun-1"
    )
    # seen in the guest: ip-fd00:99::2:3260-iscsi-...-lun-1 -> ../../sdc (no brackets)
    assert iscsi.by_path("[fd00:0099::2]:3260", IQN, 0) == (
        "/dev/disk/by-path/ip-fd00:99::2:3260-iscsi-iqn.2010-10.org.openstack:volume-cap-lun-0"
    )


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("10.0.0.1", IQN, 1), "invalid portal '10.0.0.1': must be ip:port or [ipv6]:port"),
        (("host:3260", IQN, 1), "invalid portal 'host:3260': must be ip:port or [ipv6]:port"),
        (
            ("fd00::1:3260", IQN, 1),
            "invalid portal 'fd00::1:3260': an IPv6 address needs brackets: [ipv6]:port",
        ),
        (("10.0.0.1:0", IQN, 1), "invalid portal '10.0.0.1:0': port must be 1-65535"),
        (("10.0.0.1:3260;reboot", IQN, 1), "invalid portal '10.0.0.1:3260;reboot'"),
        ((P0, "iqn.2010-10.org.openstack:a;reboot", 1), "invalid iqn 'iqn.2010-10.org"),
        ((P0, "iqn.2010-10.org.openstack:$(id)", 1), "invalid iqn"),
        ((P0, "-T", 1), "invalid iqn '-T'"),
        ((P0, IQN, 256), "invalid lun 256: must be an integer 0-255"),
        ((P0, IQN, -1), "invalid lun -1"),
        ((P0, IQN, "1"), "invalid lun '1'"),
        ((P0, IQN, True), "invalid lun True"),
    ],
)
def test_connect_and_disconnect_validate_before_any_command(
    tmp_path: Path, args: tuple[object, ...], message: str
) -> None:
    fake = FakeExecute()
    connector = ISCSIConnector(execute=fake, by_path_dir=tmp_path, sysfs=tmp_path)
    for call in (connector.connect, connector.disconnect):
        with pytest.raises(InvalidArgument) as err:
            call(*args)  # type: ignore[arg-type]
        assert message in str(err.value)
    assert fake.calls == []


def test_chap_must_be_a_chap_and_its_password_is_never_shown(tmp_path: Path) -> None:
    fake = FakeExecute()
    connector = ISCSIConnector(execute=fake, by_path_dir=tmp_path, sysfs=tmp_path)
    with pytest.raises(InvalidArgument, match="invalid chap 'tuple'"):
        connector.connect(P0, IQN, 1, ("user", SECRET))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as err:
        Chap("user", "short")
    assert "short" not in str(err.value)
    assert SECRET not in repr(Chap("user", SECRET))
    assert fake.calls == []


def test_connector_settings_are_validated() -> None:
    with pytest.raises(InvalidArgument, match="replacement_timeout_s 0"):
        ISCSIConnector(replacement_timeout_s=0)
    with pytest.raises(InvalidArgument, match="noop_out_s 61"):
        ISCSIConnector(noop_out_s=61)


# -- connect / disconnect through a fake iscsiadm --------------------------------------------
class Host:
    """A fake host: a login makes the udev link and the sysfs session tree appear; deleting
    the SCSI disk makes them go."""

    def __init__(self, root: Path) -> None:
        self.by_path = root / "by-path"
        self.sysfs = root / "sys"
        self.dev = root / "dev"
        for d in (self.by_path, self.sysfs, self.dev):
            d.mkdir(parents=True)
        self.fake = FakeExecute()
        self.sid = 0

    def connector(self, **kw: object) -> ISCSIConnector:
        return ISCSIConnector(
            execute=self.fake,
            by_path_dir=self.by_path,
            sysfs=self.sysfs,
            **kw,  # type: ignore[arg-type]
        )

    def attach(self, portal: str, lun: int, disk: str) -> None:
        """What the kernel and udev do after a login: sdX, its sysfs entries, the link."""
        self.sid += 1
        (self.dev / disk).write_text("")
        lun_dir = (
            self.sysfs
            / "class/iscsi_session"
            / f"session{self.sid}"
            / f"device/target{self.sid}:0:0/{self.sid}:0:0:{lun}/block"
            / disk
        )
        lun_dir.mkdir(parents=True)
        (self.sysfs / "block" / disk / "device").mkdir(parents=True)
        (self.sysfs / "block" / disk / "device" / "delete").write_text("")
        address, port = iscsi._portal_parts(portal)
        link = self.by_path / f"ip-{address}:{port}-iscsi-{IQN}-lun-{lun}"
        link.symlink_to(self.dev / disk)

    def detach(self, disk: str) -> None:
        for link in self.by_path.iterdir():
            if link.resolve().name == disk:
                link.unlink()
        for path in sorted((self.sysfs / "block" / disk).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (self.sysfs / "block" / disk).rmdir()
        for block in self.sysfs.glob(f"class/iscsi_session/*/device/*/*/block/{disk}"):
            block.rmdir()


def node(portal: str, *args: str) -> list[str]:
    return ["iscsiadm", "-m", "node", "-T", IQN, "-p", portal, *args]


def update(portal: str, key: str, value: str) -> list[str]:
    return node(portal, "-o", "update", "-n", key, "-v", value)


SETTLE = ["udevadm", "settle", "--timeout=30"]


def test_connect_logs_in_once_with_chap_and_returns_the_by_path_link(tmp_path: Path) -> None:
    host = Host(tmp_path)
    fake = host.fake
    fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS, times=1)
    fake.on(*node(P0), rc=21, stderr=NO_RECORDS, times=1)
    fake.on(*node(P0, "--login"), effect=lambda: host.attach(P0, 1, "sda"))
    path = host.connector().connect(P0, IQN, 1, Chap("vmt.image", SECRET))

    assert path == str(host.by_path / f"ip-10.99.0.2:3260-iscsi-{IQN}-lun-1")
    assert fake.calls == [
        (["iscsiadm", "-m", "session"], None),
        (node(P0), None),
        (node(P0, "-o", "new"), None),
        (update(P0, "node.startup", "manual"), None),
        (update(P0, "node.session.timeo.replacement_timeout", "5"), None),
        (update(P0, "node.conn[0].timeo.noop_out_interval", "5"), None),
        (update(P0, "node.conn[0].timeo.noop_out_timeout", "5"), None),
        (update(P0, "node.session.auth.authmethod", "CHAP"), None),
        (update(P0, "node.session.auth.username", "vmt.image"), None),
        (
            [
                "xargs",
                "-0",
                "-r",
                *node(P0, "-o", "update", "-n", "node.session.auth.password", "-v"),
            ],
            SECRET + "\0",
        ),
        (node(P0, "--login"), None),
        (SETTLE, None),
    ]
    assert not any(SECRET in " ".join(argv) for argv in fake.argvs)

    # a second connect finds the session and the link: no login
    fake.calls.clear()
    fake.on("iscsiadm", "-m", "session", stdout=f"tcp: [1] {P0},1 {IQN} (non-flash)\n")
    assert host.connector().connect(P0, IQN, 1, Chap("vmt.image", SECRET)) == path
    assert fake.argvs == [["iscsiadm", "-m", "session"], SETTLE]


def test_connect_without_chap_over_ipv6_with_an_existing_record(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS)
    host.fake.on(*node(P6, "--login"), effect=lambda: host.attach(P6, 0, "sdc"))
    path = host.connector(replacement_timeout_s=15, noop_out_s=2).connect(
        "[fd00:0099::2]:3260", IQN, 0
    )
    assert path.endswith(f"ip-fd00:99::2:3260-iscsi-{IQN}-lun-0")
    assert host.fake.argvs[1:9] == [
        node(P6),  # exists (exit 0): no "-o new"
        update(P6, "node.startup", "manual"),
        update(P6, "node.session.timeo.replacement_timeout", "15"),
        update(P6, "node.conn[0].timeo.noop_out_interval", "2"),
        update(P6, "node.conn[0].timeo.noop_out_timeout", "2"),
        update(P6, "node.session.auth.authmethod", "None"),
        node(P6, "--login"),
        SETTLE,
    ]


def test_a_session_made_meanwhile_is_no_error(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS)
    host.fake.on(*node(P0), rc=21, stderr=NO_RECORDS, times=1)

    def exists() -> None:
        host.attach(P0, 1, "sda")

    host.fake.on(*node(P0, "--login"), rc=15, stderr=LOGIN_EXISTS, effect=exists)
    assert host.connector().connect(P0, IQN, 1).endswith("-lun-1")


def test_a_failed_login_removes_the_record_it_made(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS)
    host.fake.on(*node(P0), rc=21, stderr=NO_RECORDS, times=1)
    host.fake.on(*node(P0, "--login"), rc=24, stderr="iscsiadm: Login failed (authorization)\n")
    with pytest.raises(CommandFailed) as err:
        host.connector().connect(P0, IQN, 1, Chap("vmt.image", "wrong-password"))
    assert err.value.exit_code == 24
    assert host.fake.argvs[-1] == node(P0, "-o", "delete")


def test_a_failed_login_keeps_a_record_it_did_not_make(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS)
    host.fake.on(*node(P0, "--login"), rc=8, stderr="iscsiadm: connection timed out\n")
    with pytest.raises(CommandFailed):
        host.connector().connect(P0, IQN, 1)
    assert node(P0, "-o", "delete") not in host.fake.argvs


def test_a_password_update_failure_does_not_show_the_password(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS)
    host.fake.on("xargs", rc=123, stderr=f"iscsiadm: bad value {SECRET}\n")
    with pytest.raises(CommandFailed) as err:
        host.connector().connect(P0, IQN, 1, Chap("vmt.image", SECRET))
    assert SECRET not in str(err.value) and SECRET not in err.value.stderr
    assert SECRET not in " ".join(err.value.argv)


def test_a_lun_that_never_appears_is_rescanned_then_logged_out(tmp_path: Path) -> None:
    host = Host(tmp_path)
    sessions = {"now": ""}
    host.fake.on(
        "iscsiadm", "-m", "session", "-r"
    )  # the rescan; listed first, it wins over the next
    host.fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS, times=1)
    host.fake.on(*node(P0), rc=21, stderr=NO_RECORDS, times=1)
    host.fake.on("iscsiadm", "-m", "session", stdout=f"tcp: [7] {P0},1 {IQN} (non-flash)\n")
    with pytest.raises(Timeout, match="after a rescan"):
        host.connector(device_timeout_s=0.1).connect(P0, IQN, 1)
    assert ["iscsiadm", "-m", "session", "-r", "7", "--rescan"] in host.fake.argvs
    assert host.fake.argvs[-2:] == [node(P0, "--logout"), node(P0, "-o", "delete")]
    assert sessions["now"] == ""


def test_disconnect_deletes_the_disk_then_logs_out_and_deletes_the_record(
    tmp_path: Path,
) -> None:
    host = Host(tmp_path)
    host.attach(P0, 1, "sda")
    host.fake.on("iscsiadm", "-m", "session", stdout=f"tcp: [1] {P0},1 {IQN} (non-flash)\n")
    host.fake.on("tee", effect=lambda: host.detach("sda"))
    host.connector().disconnect(P0, IQN, 1)
    delete = str(host.sysfs / "block/sda/device/delete")
    assert host.fake.calls == [
        (["iscsiadm", "-m", "session"], None),
        (["blockdev", "--flushbufs", "/dev/sda"], None),
        (["tee", "-a", delete], "1"),
        (SETTLE, None),
        (node(P0, "--logout"), None),
        (node(P0, "-o", "delete"), None),
    ]


def test_disconnect_keeps_a_session_with_another_lun(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.attach(P0, 1, "sda")
    other = host.sysfs / "class/iscsi_session/session1/device/target1:0:0/1:0:0:2/block/sdb"
    other.mkdir(parents=True)
    host.fake.on("iscsiadm", "-m", "session", stdout=f"tcp: [1] {P0},1 {IQN} (non-flash)\n")
    host.fake.on("tee", effect=lambda: host.detach("sda"))
    connector = host.connector()
    assert connector.session_disks(1) == {1: "sda", 2: "sdb"}
    connector.disconnect(P0, IQN, 1)
    assert not any("--logout" in argv for argv in host.fake.argvs)


def test_disconnect_of_what_is_gone_is_no_error(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "session", rc=21, stderr=NO_SESSIONS)
    host.fake.on(*node(P1, "--logout"), rc=21, stderr="iscsiadm: No matching sessions found\n")
    host.fake.on(*node(P1, "-o", "delete"), rc=21, stderr=NO_RECORDS)
    host.connector().disconnect(P1, IQN, 1)
    assert host.fake.argvs == [
        ["iscsiadm", "-m", "session"],
        node(P1, "--logout"),
        node(P1, "-o", "delete"),
    ]


def test_discover_records_nothing_unless_asked(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "discovery", stdout=DISCOVERY)
    connector = host.connector()
    assert connector.discover(P0) == [DiscoveredTarget(P0, 1, IQN)]
    connector.discover(P0, persist=True)
    assert host.fake.argvs == [
        ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", P0, "-o", "nonpersistent"],
        ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", P0],
    ]
    with pytest.raises(InvalidArgument):
        connector.discover("10.0.0.1")


def test_sessions_lookup(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.fake.on("iscsiadm", "-m", "session", stdout=SESSIONS)
    connector = host.connector()
    assert [s.sid for s in connector.sessions()] == [1, 2, 3]
    assert connector.session("[fd00:99:0::2]:3260", IQN) == Session("tcp", 3, P6, 1, IQN)
    assert connector.session("10.99.0.3:3260", IQN) is None
