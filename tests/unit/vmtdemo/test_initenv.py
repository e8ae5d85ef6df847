"""vmt-demo/vmt-initenv.py run with ``--root tmp_path``: what it writes, with which modes,
what it refuses, and that nothing at all is written when an argument or a tool is missing.
The written config is loaded by virtman.conf in a subprocess (oslo's CONF is process-global).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.vmtdemo.initenv import REPO, TOOLS, VMT_DEMO, WANTS, fake_tools, initenv
from virtman import conf as virtman_conf

if str(VMT_DEMO) not in sys.path:
    sys.path.insert(0, str(VMT_DEMO))

import vmtimg

PROG = "vmt-initenv.py"
DIRS = ["var/lib/virtman", "var/lib/virtman/cache", "var/lib/virtman/instances", "run/virtman"]
CHAP_PASSWORD = "s3cret-Pass!word"
UNIT_FILES = ["etc/systemd/system/virtmanserver.service", f"{WANTS}/virtmanserver.service"]


@pytest.fixture(autouse=True)
def tools(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The tools on PATH (all of them unless a test removes some); no host-IP detection."""
    present = set(TOOLS)
    fake_tools(monkeypatch, present)
    yield present


def args(root: Path, *extra: str, host_ip: str | None = "10.0.0.5") -> list[str]:
    base = ["--master-ip", "10.0.0.1", "--token", "volt-token", "--root", str(root)]
    return base + (["--host-ip", host_ip] if host_ip else []) + list(extra)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def config_values(path: Path) -> dict[str, str]:
    """The options set (not commented out) in a written config."""
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition(" = ")
            values[key] = value
    return values


def load_in_subprocess(config: Path) -> dict[str, Any]:
    """The config as virtman loads it (its nbd_psk_file, a path of the target system, is
    read under the --root the config was written to)."""
    root = config.parent.parent.parent
    code = (
        "import json, sys\n"
        "from virtman import conf\n"
        "conf.load(config_files=[sys.argv[1]])\n"
        "conf.CONF.set_override('nbd_psk_file', sys.argv[2] + conf.CONF.nbd_psk_file)\n"
        "s = conf.settings_from_conf()\n"
        "C = conf.CONF\n"
        "print(json.dumps({'host_ip': s.host_ip, 'master_url': s.master_url,\n"
        "    'master_token': s.master_token, 'api_token': C.api_token, 'driver': C.driver,\n"
        "    'chap_user': s.chap_user, 'chap_password': s.chap_password,\n"
        "    'state_dir': str(s.state_dir), 'cache_dir': str(s.cache_dir),\n"
        "    'instances_dir': str(s.instances_dir), 'run_dir': str(s.run_dir),\n"
        "    'heartbeat_interval': s.heartbeat_interval, 'listen_port': C.listen_port,\n"
        "    'iscsi_port': s.iscsi_port, 'insecure_targets': s.insecure_targets}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(config), str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- what is written -------------------------------------------------------------------------
def test_writes_the_config_and_the_dirs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert initenv.main(args(tmp_path)) == 0
    config = tmp_path / "etc/virtman/virtman.conf"
    key_file = tmp_path / "etc/virtman/nbd.psk"
    files = ["etc/virtman/virtman.conf", "etc/virtman/nbd.psk", *UNIT_FILES]
    dirs = ["etc", "etc/virtman", "etc/systemd", "etc/systemd/system", WANTS]
    assert tree(tmp_path) == sorted([*dirs, *files, "var", "var/lib", "run", *DIRS])
    assert mode(config) == 0o600
    assert mode(key_file) == 0o600
    assert re.fullmatch(r"vmthunder:[0-9a-f]{64}\n", key_file.read_text())
    for d in ["etc", "etc/virtman", "var", "var/lib", "run"]:
        assert (tmp_path / d).is_dir() and mode(tmp_path / d) == 0o755, d
    for d in DIRS:  # virtman's state directories (issue 10)
        assert (tmp_path / d).is_dir() and mode(tmp_path / d) == 0o700, d
    values = config_values(config)
    password = values.pop("chap_password")
    assert re.fullmatch(r"[0-9a-f]{32}", password)  # generated: CHAP is on by default
    assert values == {
        "host_ip": "10.0.0.5",
        "master_ip": "10.0.0.1",
        "master_token": "volt-token",
        "api_token": "volt-token",
        "driver": "qemu",
        "chap_user": "vmthunder",
        "nbd_psk_file": "/etc/virtman/nbd.psk",
    }
    out, err = capsys.readouterr()
    assert err == ""
    assert password not in out and key_file.read_text().split(":")[1].strip() not in out
    assert f"created {tmp_path}/var/lib/virtman/cache/" in out.splitlines()
    assert (
        f"wrote {config} (mode 0600): host_ip 10.0.0.5, Volt 10.0.0.1:7447, driver qemu, "
        "CHAP generated (user vmthunder)" in out.splitlines()
    )
    assert (
        f"generated a new NBD key in {key_file} (mode 0600), identity vmthunder" in out.splitlines()
    )
    assert out.splitlines()[-3:] == [
        "start the node with:",
        "    systemctl start virtmanserver.service",
        f"    (without systemd: virtmanserver --config-file {config})",
    ]


def test_every_other_option_is_left_at_its_default_commented_out(tmp_path: Path) -> None:
    assert initenv.main(args(tmp_path)) == 0
    lines = (tmp_path / "etc/virtman/virtman.conf").read_text().splitlines()
    assert lines.count("[DEFAULT]") == 1
    set_here = {"host_ip", "master_ip", "master_token", "api_token", "driver"}
    set_here |= {"chap_user", "chap_password", "nbd_psk_file"}
    for opt in virtman_conf.default_opts:
        mine = [line for line in lines if line.lstrip("#").startswith(f"{opt.dest} = ")]
        assert len(mine) == 1, opt.dest
        if opt.dest not in set_here:
            default = "<None>" if opt.default is None else opt.default
            assert mine == [f"#{opt.dest} = {default}"]


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o027])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert initenv.main(args(tmp_path, "--test-image", "img:1")) == 0
    finally:
        os.umask(old)
    assert mode(tmp_path / "etc/virtman/virtman.conf") == 0o600
    assert mode(tmp_path / "var/lib/virtman/images/img.raw") == 0o644
    assert {mode(tmp_path / d) for d in DIRS} == {0o700}


def test_existing_dirs_are_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "var/lib/virtman"
    state.mkdir(parents=True)
    state.chmod(0o700)
    (state / "journal.json").write_text("{}")
    assert initenv.main(args(tmp_path)) == 0
    assert mode(state) == 0o700
    assert (state / "journal.json").read_text() == "{}"
    out = capsys.readouterr().out
    assert f"created {state}/\n" not in out
    assert f"created {state}/cache/\n" in out


def test_a_given_nbd_key_is_copied_and_an_existing_one_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / "cluster.psk"
    given.write_text("cluster:" + "ab" * 32 + "\n")
    given.chmod(0o600)
    root = tmp_path / "root"
    root.mkdir()
    assert initenv.main(args(root, "--nbd-psk-file", str(given))) == 0
    key_file = root / "etc/virtman/nbd.psk"
    assert key_file.read_text() == given.read_text() and mode(key_file) == 0o600
    out = capsys.readouterr().out
    assert f"wrote {key_file} (mode 0600) from {given}, identity cluster" in out.splitlines()
    assert "ab" * 32 not in out
    # a second run (--force, no key given) keeps the cluster's key: nodes must share it
    assert initenv.main(args(root, "--force")) == 0
    assert key_file.read_text() == given.read_text()
    assert f"kept {key_file}, identity cluster" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("text", "file_mode", "rule"),
    [
        ("k:" + "ab" * 32 + "\n", 0o644, "is mode 0644: must be 0600"),
        ("k:abc\n", 0o600, "line 1 must be identity:hexkey (32+ hex digits)"),
    ],
)
def test_a_bad_nbd_key_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, file_mode: int, rule: str
) -> None:
    given = tmp_path / "bad.psk"
    given.write_text(text)
    given.chmod(file_mode)
    root = tmp_path / "root"
    root.mkdir()
    assert initenv.main(args(root, "--nbd-psk-file", str(given))) == 2
    assert tree(root) == []
    err = capsys.readouterr().err
    assert f"{PROG}: error: --nbd-psk-file {str(given)!r}: {rule}" in err.splitlines()


def test_api_token_and_chap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--api-token", "rpc-token", "--chap-user", "vmt", "--chap-password", CHAP_PASSWORD]
    assert initenv.main(args(tmp_path, *extra)) == 0
    values = config_values(tmp_path / "etc/virtman/virtman.conf")
    assert (values["master_token"], values["api_token"]) == ("volt-token", "rpc-token")
    assert (values["chap_user"], values["chap_password"]) == ("vmt", CHAP_PASSWORD)
    out, _ = capsys.readouterr()
    assert "CHAP given (user vmt)" in out
    for secret in ("volt-token", "rpc-token", CHAP_PASSWORD):
        assert secret not in out


def test_node_secret_makes_master_token_the_node_token(tmp_path: Path) -> None:
    from volt.auth import node_token

    assert initenv.main(args(tmp_path, "--node-secret", "cluster-secret")) == 0
    values = config_values(tmp_path / "etc/virtman/virtman.conf")
    assert values["master_token"] == node_token("cluster-secret", "10.0.0.5")
    assert values["api_token"] == "volt-token"


def test_detects_the_host_ip_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(initenv.virtman_conf, "detect_host_ip", lambda: "10.0.0.77")
    assert initenv.main(args(tmp_path, host_ip=None)) == 0
    assert config_values(tmp_path / "etc/virtman/virtman.conf")["host_ip"] == "10.0.0.77"


def test_no_detectable_host_ip_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail() -> str:
        raise ValueError("cannot detect host_ip (no default route): set host_ip")

    monkeypatch.setattr(initenv.virtman_conf, "detect_host_ip", fail)
    assert initenv.main(args(tmp_path, host_ip=None)) == 2
    assert tree(tmp_path) == []
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: cannot detect this node's address (cannot detect host_ip (no default "
        "route): set host_ip): give --host-ip",
        f"{PROG}: nothing was written",
    ]


def test_ipv6_addresses_are_written_canonical(tmp_path: Path) -> None:
    argv = ["--master-ip", "FD00:0::1", "--host-ip", "fd00::0:5", "--token", "t"]
    assert initenv.main([*argv, "--root", str(tmp_path)]) == 0
    values = config_values(tmp_path / "etc/virtman/virtman.conf")
    assert (values["master_ip"], values["host_ip"]) == ("fd00::1", "fd00::5")


def test_several_masters_make_master_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Masters sharing one PostgreSQL (docs/ha.rst): every one in master_url, in the order
    given; master_ip is the first; virtman loads the list."""
    argv = ["--master-ip", "10.0.0.12,10.0.0.11", "--host-ip", "10.0.0.5", "--token", "t"]
    assert initenv.main([*argv, "--root", str(tmp_path)]) == 0
    config = tmp_path / "etc/virtman/virtman.conf"
    values = config_values(config)
    assert values["master_ip"] == "10.0.0.12"
    assert values["master_url"] == "http://10.0.0.12:7447, http://10.0.0.11:7447"
    out = capsys.readouterr().out.splitlines()
    assert any("Volt http://10.0.0.12:7447, http://10.0.0.11:7447, driver qemu" in x for x in out)
    loaded = load_in_subprocess(config)
    assert loaded["master_url"] == "http://10.0.0.12:7447,http://10.0.0.11:7447"
    # the same arguments again keep the config; another list is refused without --force
    assert initenv.main([*argv, "--root", str(tmp_path)]) == 0
    other = ["--master-ip", "10.0.0.11,10.0.0.12", *argv[2:], "--root", str(tmp_path)]
    assert initenv.main(other) == 1
    assert config_values(config)["master_url"] == values["master_url"]


def test_one_master_writes_no_master_url(tmp_path: Path) -> None:
    assert initenv.main(args(tmp_path)) == 0
    assert "master_url" not in config_values(tmp_path / "etc/virtman/virtman.conf")


def test_ipv6_masters_are_bracketed_in_master_url(tmp_path: Path) -> None:
    argv = ["--master-ip", "FD00::1,10.0.0.2", "--host-ip", "fd00::5", "--token", "t"]
    assert initenv.main([*argv, "--root", str(tmp_path)]) == 0
    values = config_values(tmp_path / "etc/virtman/virtman.conf")
    assert values["master_url"] == "http://[fd00::1]:7447, http://10.0.0.2:7447"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.1,10.0.0.1", "--master-ip '10.0.0.1,10.0.0.1': an address is given twice"),
        ("10.0.0.1,10.0.0.01", "--master-ip '10.0.0.01': not an IP address"),
        ("10.0.0.1,", "--master-ip '': not an IP address"),
        ("10.0.0.1, 10.0.0.2", "--master-ip ' 10.0.0.2': not an IP address"),
        ("10.0.0.1;10.0.0.2", "--master-ip '10.0.0.1;10.0.0.2': not an IP address"),
    ],
)
def test_bad_master_lists_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    argv = ["--master-ip", value, "--host-ip", "10.0.0.5", "--token", "t"]
    assert initenv.main([*argv, "--root", str(tmp_path)]) == 2
    assert tree(tmp_path) == []
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: {message}",
        f"{PROG}: nothing was written",
    ]


# -- test images -----------------------------------------------------------------------------
def test_test_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--test-image", "image1:2", "--test-image", "volume-image2:1"]
    assert initenv.main(args(tmp_path, *extra)) == 0
    images = tmp_path / "var/lib/virtman/images"
    assert sorted(p.name for p in images.iterdir()) == ["image1.raw", "volume-image2.raw"]
    one, two = images / "image1.raw", images / "volume-image2.raw"
    assert (one.stat().st_size, two.stat().st_size) == (2 << 20, 1 << 20)
    assert mode(images) == 0o755 and mode(one) == 0o644
    assert one.read_bytes()[: 1 << 20] != two.read_bytes()  # random, not zeros or a copy
    assert one.read_bytes().count(0) < (2 << 20) // 128
    out = capsys.readouterr().out.splitlines()
    digest = hashlib.sha256(one.read_bytes()).hexdigest()
    assert f"wrote test image {one} (2 MiB, sha256 {digest})" in out
    # the image.cfg lines it prints are valid image.cfg lines (paths of the target system)
    cfg = [line.strip() for line in out if line.startswith("    + ")]
    assert cfg == [
        "+ 10.0.0.5 image1 /var/lib/virtman/images/image1.raw",
        "+ 10.0.0.5 volume-image2 /var/lib/virtman/images/volume-image2.raw",
    ]
    assert [a.image for a in vmtimg.parse_image_cfg("\n".join(cfg))] == ["image1", "volume-image2"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("image1", "--test-image 'image1': expected NAME:MIB (e.g. image1:256)"),
        ("image1:0", "--test-image 'image1:0': the size must be 1-65536 (MiB)"),
        ("image1:65537", "--test-image 'image1:65537': the size must be 1-65536 (MiB)"),
        ("image1:1.5", "--test-image 'image1:1.5': the size must be 1-65536 (MiB)"),
        ("image1:-1", "--test-image 'image1:-1': the size must be 1-65536 (MiB)"),
        ("image1:\u00b2", "--test-image 'image1:\u00b2': the size must be 1-65536 (MiB)"),
        ("image1:1:2", "--test-image 'image1:1:2': the size must be 1-65536 (MiB)"),
        (
            ":1",
            "--test-image: invalid test image name '': use 1-64 of A-Z a-z 0-9 _ . - "
            "(not starting with _ . -)",
        ),
        (
            "../x:1",
            "--test-image: invalid test image name '../x': use 1-64 of A-Z a-z 0-9 _ . - "
            "(not starting with _ . -)",
        ),
        (
            "a/b:1",
            "--test-image: invalid test image name 'a/b': use 1-64 of A-Z a-z 0-9 _ . - "
            "(not starting with _ . -)",
        ),
        (
            "$(id):1",
            "--test-image: invalid test image name '$(id)': use 1-64 of A-Z a-z 0-9 _ . "
            "- (not starting with _ . -)",
        ),
    ],
)
def test_bad_test_images_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    assert initenv.main(args(tmp_path, "--test-image", value)) == 2
    assert tree(tmp_path) == []
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: {message}",
        f"{PROG}: nothing was written",
    ]


def test_a_test_image_given_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert initenv.main(args(tmp_path, "--test-image", "a:1", "--test-image", "a:2")) == 2
    assert tree(tmp_path) == []
    assert f"{PROG}: error: --test-image 'a': given twice\n" in capsys.readouterr().err


def test_test_images_that_do_not_fit_write_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    usage = initenv.shutil.disk_usage(tmp_path)._replace(free=100 << 20)
    monkeypatch.setattr(initenv.shutil, "disk_usage", lambda path: usage)
    assert initenv.main(args(tmp_path, "--test-image", "a:20", "--test-image", "b:20")) == 2
    assert tree(tmp_path) == []
    assert f"--test-image: 40 MiB needed, 100 MiB free under {tmp_path}" in capsys.readouterr().err


# -- refusals --------------------------------------------------------------------------------
def test_an_existing_config_is_kept_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert initenv.main(args(tmp_path)) == 0
    config = tmp_path / "etc/virtman/virtman.conf"
    before = config.read_bytes()
    capsys.readouterr()
    again = ["--master-ip", "10.0.0.2", "--token", "new", "--host-ip", "10.0.0.5"]
    assert initenv.main([*again, "--root", str(tmp_path), "--test-image", "x:1"]) == 1
    assert config.read_bytes() == before
    assert not (tmp_path / "var/lib/virtman/images").exists()  # nothing else written either
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{PROG}: error: {config} exists: give --force to replace it",
        f"{PROG}: nothing was written",
    ]
    assert initenv.main([*again, "--root", str(tmp_path), "--force"]) == 0
    assert config_values(config)["master_ip"] == "10.0.0.2"
    assert config_values(config)["master_token"] == "new"
    assert mode(config) == 0o600
    # no temporary left; the key stays (the cluster's other nodes have it)
    assert sorted(p.name for p in config.parent.iterdir()) == ["nbd.psk", "virtman.conf"]


def test_an_existing_test_image_is_kept_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "var/lib/virtman/images/img.raw"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"mine")
    assert initenv.main(args(tmp_path, "--test-image", "img:1")) == 1
    assert image.read_bytes() == b"mine"
    assert not (tmp_path / "etc").exists()
    assert f"{PROG}: error: {image} exists: give --force to replace it\n" in capsys.readouterr().err
    assert initenv.main(args(tmp_path, "--test-image", "img:1", "--force")) == 0
    assert image.stat().st_size == 1 << 20


@pytest.mark.parametrize(
    ("missing", "expected"),
    [
        (
            {"qemu-img"},
            [
                "the qemu driver needs tools that are not on PATH:",
                "  qemu-img (package qemu-utils)",
                "install them with: apt-get install qemu-utils",
            ],
        ),
        (
            {"tgtd", "tgtadm", "fusermount3"},
            [
                "the qemu driver needs tools that are not on PATH:",
                "  tgtd, tgtadm (package tgt)",
                "  fusermount3 (package fuse3)",
                "install them with: apt-get install tgt fuse3",
            ],
        ),
        (
            set(TOOLS),
            [
                "the qemu driver needs tools that are not on PATH:",
                "  qemu-storage-daemon (package qemu-system-common)",
                "  qemu-img (package qemu-utils)",
                "  tgtd, tgtadm (package tgt)",
                "  fusermount3 (package fuse3)",
                "install them with: apt-get install qemu-system-common qemu-utils tgt fuse3",
            ],
        ),
    ],
)
def test_a_missing_tool_is_exit_2_and_nothing_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tools: set[str],
    missing: set[str],
    expected: list[str],
) -> None:
    tools -= missing
    assert initenv.main(args(tmp_path, "--test-image", "img:1")) == 2
    assert tree(tmp_path) == []
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{PROG}: error: {expected[0]}",
        *expected[1:],
        f"{PROG}: nothing was written",
    ]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--master-ip", "10.0.0", "--master-ip '10.0.0': not an IP address"),
        ("--master-ip", "volt.example", "--master-ip 'volt.example': not an IP address"),
        ("--master-ip", "10.0.0.1:7447", "--master-ip '10.0.0.1:7447': not an IP address"),
        ("--master-ip", "10.0.0.01", "--master-ip '10.0.0.01': not an IP address"),
        ("--master-ip", "", "--master-ip '': not an IP address"),
        ("--master-ip", "[fd00::1]", "--master-ip '[fd00::1]': not an IP address"),
        (
            "--master-ip",
            "0.0.0.0",
            "--master-ip '0.0.0.0': must be a unicast address of one machine",
        ),
        ("--host-ip", "::", "--host-ip '::': must be a unicast address of one machine"),
        (
            "--host-ip",
            "224.0.0.1",
            "--host-ip '224.0.0.1': must be a unicast address of one machine",
        ),
        ("--host-ip", "10.0.0.5 ", "--host-ip '10.0.0.5 ': not an IP address"),
        ("--host-ip", "10.0.0.5\n", "--host-ip '10.0.0.5\\n': not an IP address"),
        ("--host-ip", "10.0.0.5;id", "--host-ip '10.0.0.5;id': not an IP address"),
        (
            "--host-ip",
            "fe80::1%eth0",
            "--host-ip 'fe80::1%eth0': scoped IPv6 addresses are not supported",
        ),
    ],
)
def test_bad_ips_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    argv = {"--master-ip": "10.0.0.1", "--host-ip": "10.0.0.5", option: value}
    assert initenv.main([*sum(argv.items(), ()), "--token", "t", "--root", str(tmp_path)]) == 2
    assert tree(tmp_path) == []
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: {message}",
        f"{PROG}: nothing was written",
    ]


TOKEN_RULE = "must be 1-1024 printable ASCII characters, without whitespace or newlines"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must not be empty"),
        ("a b", TOKEN_RULE),
        ("abc\n", TOKEN_RULE),
        ("a\nb", TOKEN_RULE),
        ("a\tb", TOKEN_RULE),
        ("a\rb", TOKEN_RULE),
        ("t\u00f6ken", TOKEN_RULE),
        ("a\x00b", TOKEN_RULE),
        ("x" * 1025, TOKEN_RULE),
    ],
)
@pytest.mark.parametrize("option", ["--token", "--api-token"])
def test_bad_tokens_write_nothing_and_are_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    argv = [*args(tmp_path), option, value]  # the later --token wins
    assert initenv.main(argv) == 2
    assert tree(tmp_path) == []
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"{PROG}: error: {option}: {message}",
        f"{PROG}: nothing was written",
    ]
    if value.strip():
        assert value.strip() not in err


def test_the_longest_token_is_accepted(tmp_path: Path) -> None:
    assert initenv.main(args(tmp_path, "--token", "x" * 1024)) == 0


PASSWORD_RULE = "--chap-password: must be 12-64 printable ASCII characters without spaces"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--chap-user", "vmt"],
            "--chap-user and --chap-password go together: give both or neither",
        ),
        (
            ["--chap-password", CHAP_PASSWORD],
            "--chap-user and --chap-password go together: give both or neither",
        ),
        (["--chap-user", "vmt", "--chap-password", "short-pass1"], PASSWORD_RULE),  # 11
        (["--chap-user", "vmt", "--chap-password", "p" * 65], PASSWORD_RULE),
        (["--chap-user", "vmt", "--chap-password", "with a space!"], PASSWORD_RULE),
        (["--chap-user", "vmt", "--chap-password", "p\u00e4ssword-long"], PASSWORD_RULE),
        (
            ["--chap-user", "a/b", "--chap-password", CHAP_PASSWORD],
            "--chap-user 'a/b': must be 1-64 of A-Z a-z 0-9 . _ : -",
        ),
        (
            ["--chap-user", "", "--chap-password", CHAP_PASSWORD],
            "--chap-user '': must be 1-64 of A-Z a-z 0-9 . _ : -",
        ),
        (
            ["--chap-user", "u" * 65, "--chap-password", CHAP_PASSWORD],
            f"--chap-user {'u' * 65!r}: must be 1-64 of A-Z a-z 0-9 . _ : -",
        ),
    ],
)
def test_bad_chap_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert initenv.main(args(tmp_path, *extra)) == 2
    assert tree(tmp_path) == []
    err = capsys.readouterr().err
    assert err.splitlines() == [f"{PROG}: error: {message}", f"{PROG}: nothing was written"]
    if "--chap-password" in extra:
        assert extra[extra.index("--chap-password") + 1] not in err


@pytest.mark.parametrize("password", ["p" * 12, "p" * 64, "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"])
def test_chap_password_limits(tmp_path: Path, password: str) -> None:
    extra = ["--chap-user", "iqn.2024-01:u_1", "--chap-password", password]
    assert initenv.main(args(tmp_path, *extra)) == 0


def test_every_bad_argument_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--master-ip", "x", "--host-ip", "y", "--token", "a b", "--chap-user", "u"]
    assert initenv.main([*argv, "--root", str(tmp_path), "--test-image", "i"]) == 2
    assert tree(tmp_path) == []
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: error: --master-ip 'x': not an IP address",
        f"{PROG}: error: --host-ip 'y': not an IP address",
        f"{PROG}: error: --token: {TOKEN_RULE}",
        f"{PROG}: error: --chap-user and --chap-password go together: give both or neither",
        f"{PROG}: error: --test-image 'i': expected NAME:MIB (e.g. image1:256)",
        f"{PROG}: nothing was written",
    ]


def test_root_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert initenv.main(args(missing)) == 2
    assert not missing.exists()
    assert f"{PROG}: error: --root {str(missing)!r}: not a directory\n" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--token", "t"],  # --master-ip is required
        ["--master-ip", "10.0.0.1"],  # --token is required
        ["--master-ip", "10.0.0.1", "--token", "t", "--driver", "dm"],
        ["--master-ip", "10.0.0.1", "--token", "t", "--bogus"],
    ],
)
def test_usage_errors(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert initenv.main([*argv, "--root", str(tmp_path), "--host-ip", "10.0.0.5"]) == 2
    assert tree(tmp_path) == []
    assert capsys.readouterr().err.startswith("usage: vmt-initenv.py")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert initenv.main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--master-ip",
        "--host-ip",
        "--token",
        "--api-token",
        "--driver",
        "--chap-user",
        "--chap-password",
        "--root",
        "--test-image",
        "--force",
    ):
        assert option in out
    assert "virtmanserver --config-file /etc/virtman/virtman.conf" in out
    assert "exit status" in out


# -- the network checks (only for --root /) --------------------------------------------------
def test_network_checks_only_for_the_real_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[Any] = []

    def warnings(host_ip: str, ports: Any) -> list[str]:
        seen.append((host_ip, ports))
        return ["port 3260 on 10.0.0.5 is in use; it is for x"]

    monkeypatch.setattr(initenv, "network_warnings", warnings)
    assert initenv.main(args(tmp_path)) == 0
    assert seen == []
    monkeypatch.setattr(initenv, "run", lambda plan, out: 0)  # never write to the real /
    assert initenv.main(args(Path("/"))) == 0
    assert [(h, [p for p, _ in ports]) for h, ports in seen] == [("10.0.0.5", [3260, 7774, 10809])]
    assert (
        f"{PROG}: warning: port 3260 on 10.0.0.5 is in use; it is for x" in capsys.readouterr().err
    )


def test_network_warnings_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert initenv.network_warnings("127.0.0.1", [(port, "tgtd")]) == [
            f"port {port} on 127.0.0.1 is in use; it is for tgtd"
        ]
    assert initenv.network_warnings("127.0.0.1", [(port, "tgtd")]) == []


def test_network_warnings_an_address_of_another_machine() -> None:
    assert initenv.network_warnings("192.0.2.1", [(3260, "tgtd")]) == [
        "host_ip 192.0.2.1 is not an address of this machine (other nodes reach this one at "
        "host_ip)"
    ]


# -- the written config, loaded by virtman ---------------------------------------------------
def test_the_written_config_loads_in_virtman(tmp_path: Path) -> None:
    assert initenv.main(args(tmp_path)) == 0
    loaded = load_in_subprocess(tmp_path / "etc/virtman/virtman.conf")
    assert loaded == {
        "host_ip": "10.0.0.5",
        "master_url": "http://10.0.0.1:7447",
        "master_token": "volt-token",
        "api_token": "volt-token",
        "driver": "qemu",
        "chap_user": "vmthunder",
        "chap_password": loaded["chap_password"],
        "state_dir": "/var/lib/virtman",
        "cache_dir": "/var/lib/virtman/cache",
        "instances_dir": "/var/lib/virtman/instances",
        "run_dir": "/run/virtman",
        "heartbeat_interval": 20,
        "listen_port": 7774,
        "iscsi_port": 3260,
        "insecure_targets": False,
    }
    assert len(loaded["chap_password"]) == 32


def test_tokens_and_passwords_with_ini_syntax_load_back_unchanged(tmp_path: Path) -> None:
    token = "\"q'$HOME${x}$$#;%(y)s="
    api_token = "'single'"
    password = '"pa$$word#;x"'
    argv = ["--master-ip", "fd00::1", "--host-ip", "fd00::5", "--token", token]
    argv += ["--api-token", api_token, "--chap-user", "vmt", "--chap-password", password]
    assert initenv.main([*argv, "--root", str(tmp_path)]) == 0
    loaded = load_in_subprocess(tmp_path / "etc/virtman/virtman.conf")
    assert (loaded["host_ip"], loaded["master_url"]) == ("fd00::5", "http://[fd00::1]:7447")
    assert (loaded["master_token"], loaded["api_token"]) == (token, api_token)
    assert (loaded["chap_user"], loaded["chap_password"]) == ("vmt", password)


@pytest.mark.parametrize(
    ("value", "written"),
    [("plain", "plain"), ("a$b", "a$$b"), ('"x"', '""x""'), ("'x", '"\'x"'), ('x"', 'x"')],
)
def test_ini_value(value: str, written: str) -> None:
    assert initenv.ini_value(value) == written
