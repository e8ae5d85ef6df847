"""Issue 10: a node serves iSCSI only with CHAP and NBD only with a pre-shared key, unless
``insecure_targets`` (then it says so at every start); the key file's rules."""

from __future__ import annotations

import logging
import re
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from brick import psk
from brick.exception import InvalidArgument
from tests.unit.fakes.settings import settings as unit_settings
from virtman.conf import Settings, announced_api_port, check_data_plane

KEY = "vmt:" + "0123456789abcdef" * 4 + "\n"


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "nbd.psk"
    path.write_text(KEY)
    path.chmod(0o600)
    return path


@pytest.fixture
def secure(tmp_path: Path, key: Path) -> Settings:
    base = unit_settings(tmp_path / "state")
    return replace(base, chap_user="vmt", chap_password="s3cret-pass-123", nbd_psk_file=key)


def test_issue_10_with_chap_and_a_key_a_node_starts_quietly(
    secure: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    for driver in ("qemu", "dm"):
        check_data_plane(secure, driver)
    assert caplog.records == []


@pytest.mark.parametrize(
    ("change", "driver", "missing"),
    [
        ({"chap_user": None, "chap_password": None}, "qemu", "chap_user/chap_password"),
        ({"nbd_psk_file": None}, "qemu", "nbd_psk_file"),
        (
            {"chap_user": None, "chap_password": None, "nbd_psk_file": None},
            "qemu",
            "chap_user/chap_password and nbd_psk_file",
        ),
        ({"chap_user": None, "chap_password": None}, "dm", "chap_user/chap_password"),
        ({"nbd_psk_file": None, "dm_nbd_relay": True}, "dm", "nbd_psk_file"),
    ],
)
def test_issue_10_missing_credentials_refuse_the_start(
    secure: Settings, change: dict[str, object], driver: str, missing: str
) -> None:
    with pytest.raises(
        ValueError, match=f"^refusing to serve unauthenticated targets: set {missing} "
    ):
        check_data_plane(replace(secure, **change), driver)  # type: ignore[arg-type]


def test_issue_10_a_dm_node_without_nbd_relay_needs_no_key(secure: Settings) -> None:
    check_data_plane(replace(secure, nbd_psk_file=None), "dm")


def test_issue_10_insecure_targets_warns_naming_what_is_open(
    secure: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    open_node = replace(
        secure, chap_user=None, chap_password=None, nbd_psk_file=None, insecure_targets=True
    )
    with caplog.at_level(logging.WARNING):
        check_data_plane(open_node, "qemu")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "insecure_targets = true: serving iSCSI targets without CHAP and NBD exports "
            "without TLS; anyone who reaches this node reads its images",
        )
    ]
    caplog.clear()
    check_data_plane(replace(secure, insecure_targets=True), "qemu")  # nothing open: quiet
    assert caplog.records == []


def test_half_a_chap_account_is_refused_even_when_insecure(secure: Settings) -> None:
    with pytest.raises(ValueError, match="set both chap_user and chap_password, or neither"):
        check_data_plane(replace(secure, chap_password=None, insecure_targets=True), "qemu")


@pytest.mark.parametrize(
    ("text", "mode", "rule"),
    [
        (KEY, 0o644, "is mode 0644: must be 0600"),
        (KEY, 0o640, "is mode 0640: must be 0600"),
        ("", 0o600, "must hold an identity:hexkey line"),
        ("vmt:abcd\n", 0o600, "line 1 must be identity:hexkey (32+ hex digits)"),
        ("vmt " + "ab" * 16 + "\n", 0o600, "must be identity:hexkey"),
        ("vmt:" + "zz" * 16 + "\n", 0o600, "must be identity:hexkey"),
    ],
)
def test_a_bad_key_file_is_refused(
    secure: Settings, key: Path, text: str, mode: int, rule: str
) -> None:
    key.write_text(text)
    key.chmod(mode)
    with pytest.raises(ValueError, match=f"^invalid nbd_psk_file '{key}': .*{re.escape(rule)}"):
        check_data_plane(secure, "qemu")
    with pytest.raises(InvalidArgument):  # insecure_targets does not excuse a broken key
        psk.read(key)


def test_install_copies_the_key_for_qemu_and_keeps_it_private(key: Path, tmp_path: Path) -> None:
    directory, identity = psk.install(key, tmp_path / "run" / "nbd-psk")
    assert identity == "vmt"
    assert (directory / "keys.psk").read_text() == KEY
    assert stat.S_IMODE((directory / "keys.psk").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    key.write_text("new:" + "ab" * 32 + "\n")  # a rotated key replaces the copy
    assert psk.install(key, directory) == (directory, "new")
    assert (directory / "keys.psk").read_text() == key.read_text()
    # QEMU's server credentials load these instead of generating DH parameters
    assert (directory / "dh-params.pem").read_text() == psk.FFDHE2048
    assert stat.S_IMODE((directory / "dh-params.pem").stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["dh-params.pem", "keys.psk"]
    psk.uninstall(directory)
    assert not directory.exists()


def test_write_new_makes_a_random_256_bit_key_and_never_replaces(tmp_path: Path) -> None:
    path = tmp_path / "k.psk"
    psk.write_new(path, "vmthunder")
    text = path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert psk.parse(text) == ["vmthunder"] and len(text.strip().split(":")[1]) == 64
    with pytest.raises(FileExistsError):
        psk.write_new(path, "vmthunder")
    other = tmp_path / "o.psk"
    psk.write_new(other, "vmthunder")
    assert other.read_text() != text


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_issue_10_targets_never_listen_on_every_address(secure: Settings, host: str) -> None:
    with pytest.raises(ValueError, match=f"^host_ip {host} is not an address"):
        check_data_plane(replace(secure, host_ip=host, insecure_targets=True), "qemu")
    check_data_plane(replace(secure, host_ip="node1.example"), "qemu")  # a name is fine


def test_the_api_port_is_announced_only_where_volt_can_reach_it() -> None:
    """Volt probes host_ip:api_port for the node daemon's liveness (docs/bus.rst)."""
    assert announced_api_port(None, "10.0.0.5", 7774) == 7774  # listen_host unset: host_ip
    assert announced_api_port("", "10.0.0.5", 7774) == 7774
    assert announced_api_port("10.0.0.5", "10.0.0.5", 7775) == 7775
    assert announced_api_port("0.0.0.0", "10.0.0.5", 7774) == 7774  # every interface
    assert announced_api_port("::", "fd00::5", 7774) == 7774
    assert announced_api_port("fd00:0::5", "fd00::5", 7774) == 7774  # one address, spelt twice
    assert announced_api_port("127.0.0.1", "10.0.0.5", 7774) is None  # not where Volt looks
    assert announced_api_port("node-5.example", "10.0.0.5", 7774) is None
    assert announced_api_port(None, "10.0.0.5", 0) is None
