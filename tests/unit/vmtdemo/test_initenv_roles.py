"""vmt-initenv.py as a service installer: ``--role master|node``, the systemd unit installed
and enabled, idempotent re-runs, ``--dry-run``. Everything under ``--root tmp_path``; the
only run on ``/`` is a dry run, and apt-get or systemctl are never run (a guard fails the
test if they are).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.vmtdemo.initenv import REPO, TOOLS, WANTS, fake_tools, initenv

VENV = "/srv/vmt/venv"
REAL_RUN = subprocess.run  # the guard below replaces subprocess.run (one module for all)
REAL_WHICH = shutil.which  # and shutil.which


@pytest.fixture(autouse=True)
def guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """Tools present, no host-IP detection, and no apt-get or systemctl on this host."""
    fake_tools(monkeypatch, set(TOOLS))
    real_run = REAL_RUN
    ran: list[list[str]] = []

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        ran.append(list(cmd))
        if cmd[0] in ("apt-get", "systemctl"):
            pytest.fail(f"{cmd} run on this host")
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(initenv.subprocess, "run", run)
    yield ran


def master(root: Path, *extra: str) -> list[str]:
    return [
        "--role",
        "master",
        "--host-ip",
        "10.0.0.1",
        "--root",
        str(root),
        "--venv",
        VENV,
        *extra,
    ]


def node(root: Path, *extra: str) -> list[str]:
    base = ["--role", "node", "--master-ip", "10.0.0.1", "--token", "node-token"]
    return [*base, "--host-ip", "10.0.0.5", "--root", str(root), "--venv", VENV, *extra]


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under root -> its content (files) or link target (symlinks)."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = path.read_bytes()
        else:
            found[rel] = "dir"
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def sections(path: Path) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif line and not line.startswith("#"):
            key, _, value = line.partition(" = ")
            found.setdefault(current, {})[key] = value
    return found


# -- master ----------------------------------------------------------------------------------
def test_master_writes_volt_conf_and_installs_the_enabled_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert initenv.main(master(tmp_path)) == 0
    config = tmp_path / "etc/volt/volt.conf"
    unit = tmp_path / "etc/systemd/system/volt-api.service"
    link = tmp_path / WANTS / "volt-api.service"
    assert sorted(tree(tmp_path)) == sorted(
        ["etc", "etc/volt", "etc/volt/volt.conf", "etc/systemd", "etc/systemd/system",
         "etc/systemd/system/volt-api.service", WANTS, f"{WANTS}/volt-api.service"]
    )  # fmt: skip
    assert mode(config) == 0o600 and mode(unit) == 0o644
    values = sections(config)
    token, secret = values["auth"]["token"], values["auth"]["node_secret"]
    assert re.fullmatch(r"[0-9a-f]{64}", token) and re.fullmatch(r"[0-9a-f]{64}", secret)
    assert token != secret
    assert values == {"DEFAULT": {"bind_host": "10.0.0.1"}, "auth": values["auth"]}
    shipped = (REPO / "etc/systemd/volt-api.service").read_text()
    assert unit.read_text() == shipped.replace("/opt/vmthunder/bin/", f"{VENV}/bin/")
    assert f"ExecStart={VENV}/bin/volt-api --config-file %d/volt.conf" in unit.read_text()
    assert os.readlink(link) == "/etc/systemd/system/volt-api.service"
    out, err = capsys.readouterr()
    assert err == ""
    assert token not in out and secret not in out
    assert (
        f"wrote {config} (mode 0600): bind_host 10.0.0.1, database SQLite in /var/lib/volt, "
        "generated: node_secret, token" in out.splitlines()
    )
    assert out.splitlines()[-2] == "    systemctl start volt-api.service"


def test_the_master_config_loads_in_volt_and_nodes_get_their_token(tmp_path: Path) -> None:
    """volt-manage reads the written volt.conf; a node run with --node-secret gets the
    very token volt-manage prints for it."""
    db = "postgresql+psycopg://volt:pw@db.example/volt"
    assert initenv.main(master(tmp_path, "--database", db)) == 0
    config = tmp_path / "etc/volt/volt.conf"
    assert sections(config)["database"] == {"connection": db}
    secret = sections(config)["auth"]["node_secret"]
    done = subprocess.run(
        [sys.executable, "-m", "volt.cmd.manage", "--config-file", str(config),
         "node-token", "10.0.0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = done.stdout.strip()
    nodes = tmp_path / "node"
    nodes.mkdir()
    argv = node(nodes, "--node-secret", secret)
    assert initenv.main(argv) == 0
    node_conf = (nodes / "etc/virtman/virtman.conf").read_text()
    assert f"master_token = {expected}\n" in node_conf


def test_master_rejects_node_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = master(tmp_path, "--master-ip", "10.0.0.9", "--test-image", "a:1", "--driver", "dm")
    assert initenv.main(argv) == 2  # dm is no driver of this tool at all: argparse says so
    argv = master(tmp_path, "--master-ip", "10.0.0.9", "--test-image", "a:1", "--token", "x")
    assert initenv.main([*argv, "--node-secret", "x"]) == 2
    err = capsys.readouterr().err
    assert "vmt-initenv.py: error: --master-ip: only for --role node" in err
    assert "vmt-initenv.py: error: --test-image: only for --role node" in err
    assert "vmt-initenv.py: error: --node-secret must differ from --token" in err
    assert tree(tmp_path) == {}
    assert initenv.main(node(tmp_path, "--database", "sqlite://")) == 2
    assert "--database: only for --role master" in capsys.readouterr().err
    assert tree(tmp_path) == {}


# -- idempotence -----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["master", "node"])
def test_a_second_run_with_the_same_arguments_changes_nothing(
    tmp_path: Path, role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = master(tmp_path) if role == "master" else node(tmp_path, "--test-image", "img:1")
    assert initenv.main(argv) == 0
    before = tree(tmp_path)
    capsys.readouterr()
    assert initenv.main(argv) == 0
    assert tree(tmp_path) == before  # same generated credentials, key, image, unit, link
    out = capsys.readouterr().out
    config = tmp_path / ("etc/volt/volt.conf" if role == "master" else "etc/virtman/virtman.conf")
    unit = "volt-api.service" if role == "master" else "virtmanserver.service"
    assert f"kept {config} (it sets what the arguments give)" in out.splitlines()
    assert f"kept {tmp_path}/etc/systemd/system/{unit} (unchanged)" in out.splitlines()
    assert f"kept {tmp_path}/{WANTS}/{unit} (enabled)" in out.splitlines()
    assert "wrote" not in out and "created" not in out


@pytest.mark.parametrize("role", ["master", "node"])
def test_a_config_that_says_otherwise_is_refused_without_force(
    tmp_path: Path, role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make = master if role == "master" else node
    assert initenv.main(make(tmp_path)) == 0
    before = tree(tmp_path)
    capsys.readouterr()
    other = [a if a not in ("10.0.0.1",) else "10.0.0.2" for a in make(tmp_path)]
    assert initenv.main(other) == 1
    assert tree(tmp_path) == before
    config = tmp_path / ("etc/volt/volt.conf" if role == "master" else "etc/virtman/virtman.conf")
    assert capsys.readouterr().err.splitlines() == [
        f"vmt-initenv.py: error: {config} exists: give --force to replace it",
        "vmt-initenv.py: nothing was written",
    ]
    assert initenv.main([*other, "--force"]) == 0
    assert "= 10.0.0.2\n" in config.read_text()


def test_an_upgraded_unit_replaces_the_old_one(tmp_path: Path) -> None:
    assert initenv.main(master(tmp_path)) == 0
    unit = tmp_path / "etc/systemd/system/volt-api.service"
    unit.write_text("[Service]\nExecStart=/old\n")
    assert initenv.main(master(tmp_path)) == 0
    assert "ExecStart=/srv/vmt/venv/bin/volt-api" in unit.read_text()
    assert mode(unit) == 0o644


# -- units -----------------------------------------------------------------------------------
def test_node_unit_enabled_and_the_tgt_service_disabled(tmp_path: Path) -> None:
    wants = tmp_path / WANTS
    wants.mkdir(parents=True)
    (wants / "tgt.service").symlink_to("/lib/systemd/system/tgt.service")
    assert initenv.main(node(tmp_path)) == 0
    assert sorted(p.name for p in wants.iterdir()) == ["virtmanserver.service"]
    unit = (tmp_path / "etc/systemd/system/virtmanserver.service").read_text()
    assert f"ExecStart={VENV}/bin/virtmanserver --config-file /etc/virtman/virtman.conf" in unit


def test_no_enable_installs_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert initenv.main(master(tmp_path, "--no-enable")) == 0
    assert (tmp_path / "etc/systemd/system/volt-api.service").is_file()
    assert not (tmp_path / WANTS).exists()
    assert "not enabled (--no-enable): systemctl enable volt-api.service" in capsys.readouterr().out


def test_systemctl_sees_the_unit_enabled(tmp_path: Path) -> None:
    """The link made without a running systemd is the one `systemctl enable` makes."""
    assert REAL_WHICH("systemctl"), "systemctl missing: tools/setup.sh installs systemd"
    assert initenv.main(node(tmp_path)) == 0
    for unit in ("virtmanserver.service",):
        done = REAL_RUN(
            ["systemctl", f"--root={tmp_path}", "is-enabled", unit],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (done.returncode, done.stdout.strip()) == (0, "enabled"), done.stderr


# -- dry run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["master", "node"])
def test_dry_run_writes_nothing_and_says_what_it_would_do(
    tmp_path: Path, role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = master(tmp_path) if role == "master" else node(tmp_path, "--test-image", "i:2")
    assert initenv.main([*argv, "--dry-run"]) == 0
    assert tree(tmp_path) == {}
    out = capsys.readouterr().out.splitlines()
    unit = "volt-api.service" if role == "master" else "virtmanserver.service"
    config = tmp_path / ("etc/volt/volt.conf" if role == "master" else "etc/virtman/virtman.conf")
    assert out[0].startswith("skip packages under --root (on the target: python3-venv")
    assert any(line.startswith(f"would write {config} (mode 0600): ") for line in out)
    assert f"would install {tmp_path}/etc/systemd/system/{unit} (ExecStart in {VENV}/bin)" in out
    assert f"would enable {unit}" in out
    assert out[-1] == "dry run: nothing was written"
    if role == "node":
        assert f"would write test image {tmp_path}/var/lib/virtman/images/i.raw (2 MiB)" in out


def test_dry_run_on_this_host_only_looks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On / a dry run queries dpkg and binds no more than the network checks do; run()
    (the only writer) is never reached."""
    monkeypatch.setattr(initenv, "run", lambda plan, out: pytest.fail("run() on /"))
    monkeypatch.setattr(initenv, "missing_packages", lambda names: ["python3-venv"])
    monkeypatch.setattr(initenv, "network_warnings", lambda host, ports: [])
    argv = ["--role", "master", "--host-ip", "10.0.0.1", "--venv", VENV, "--dry-run"]
    assert initenv.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "would install packages: python3-venv"
    assert (
        "would install /etc/systemd/system/volt-api.service (ExecStart in /srv/vmt/venv/bin)" in out
    )


def test_default_venv_is_this_one_only_when_it_has_the_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(initenv.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(initenv.sys, "base_prefix", "/usr")
    assert initenv.default_venv("master") == Path("/opt/vmthunder")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/volt-api").write_text("")
    assert initenv.default_venv("master") == tmp_path
    assert initenv.default_venv("node") == Path("/opt/vmthunder")
