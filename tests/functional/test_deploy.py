"""Install like a service (issue 14, Build 1): the wheel and the systemd units.

The wheel is built from a copy of this tree (so the tree is not touched), installed into a
fresh venv, and every console script of setup.cfg plus ``vmt-initenv.py`` must answer
``--help`` from that venv (exit 0, its own usage line). The units of ``etc/systemd/``, with
ExecStart pointing at that venv as ``vmt-initenv.py --venv`` would write them, must pass
``systemd-analyze verify`` with no output at all. The venv's own ``vmt-initenv.py`` then
prepares a master and a node under a temporary ``--root`` (never this host's /etc): the
units it installs point at that venv and verify clean, and the installed ``volt-api``
serves with the credentials it generated.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from brick.wait import wait_until
from tests.functional.voltproc import free_port

REPO = Path(__file__).resolve().parents[2]
UNITS = ["volt-api.service", "virtmanserver.service"]
DEFAULT_VENV = "/opt/vmthunder"
# A phrase each --help must contain besides its usage line (what the command is for).
HELP_WORDS = {
    "volt-api": "--config-file",
    "volt-manage": "node-token",
    "volt": "volume-list",
    "virtmanserver": "--config-file",
    "virtman-halt": "--at-shutdown",
    "virtman": "--url",
    "vmt-initenv.py": "--role",
}


def console_scripts() -> dict[str, str]:
    """name -> entry point, from setup.cfg."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    text = parser["options.entry_points"]["console_scripts"]
    pairs = [line.split("=", 1) for line in text.strip().splitlines()]
    return {name.strip(): target.strip() for name, target in pairs}


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def run(cmd: list[str], timeout: float = 300, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The wheel built from a copy of this tree, installed in a new venv (deps from pip)."""
    base = tmp_path_factory.mktemp("deploy")
    src = base / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".work", "build", "dist", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    dist = base / "dist"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), "."], cwd=src
    )
    assert built.returncode == 0, built.stderr
    wheels = list(dist.glob("vmthunder-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    pip = run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(wheels[0])])
    assert pip.returncode == 0, pip.stderr
    yield Installed(wheels[0], venv)


def test_wheel_has_every_console_script_and_the_service_files(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = whl.read(info).decode()
    for name, target in console_scripts().items():
        assert f"{name} = {target}" in entry_points
    data = "vmthunder-0.1.0.data/data/share/vmthunder"
    for unit in UNITS:
        assert f"{data}/systemd/{unit}" in names
    assert f"{data}/doc/deploy.rst" in names
    assert "vmthunder-0.1.0.data/scripts/vmt-initenv.py" in names
    assert "volt/api/openapi.json" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


@pytest.mark.parametrize("name", [*sorted(console_scripts()), "vmt-initenv.py"])
def test_each_command_of_the_venv_answers_help(installed: Installed, name: str) -> None:
    result = run([str(installed.bin(name)), "--help"], timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {name} "), result.stdout[:200]
    assert HELP_WORDS[name] in result.stdout


def test_the_venv_runs_its_own_copy_not_this_tree(installed: Installed) -> None:
    code = "import brick, virtman, virtmanclient, volt, voltclient; print(volt.__file__)"
    result = run([str(installed.bin("python")), "-c", code], timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(installed.venv)
    shipped = installed.venv / "share/vmthunder/systemd"
    for unit in UNITS:
        assert (shipped / unit).read_text() == (REPO / "etc/systemd" / unit).read_text()


def test_units_pass_systemd_analyze_verify(installed: Installed, tmp_path: Path) -> None:
    """Clean: exit 0 and not one line of warning, ExecStart resolved to the installed venv."""
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: run tools/setup.sh"
    paths = []
    for unit in UNITS:
        text = (REPO / "etc/systemd" / unit).read_text()
        assert f"ExecStart={DEFAULT_VENV}/bin/" in text
        path = tmp_path / unit
        path.write_text(text.replace(f"{DEFAULT_VENV}/bin/", f"{installed.venv}/bin/"))
        paths.append(str(path))
    result = run(["systemd-analyze", "verify", *paths], timeout=120)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_catches_a_broken_unit(installed: Installed, tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive and a missing binary are reported."""
    text = (REPO / "etc/systemd/volt-api.service").read_text()
    broken = tmp_path / "volt-api.service"
    broken.write_text(text.replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = run(["systemd-analyze", "verify", str(broken)], timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "ProtectSystm" in output
    assert f"{DEFAULT_VENV}/bin/volt-api" in output or "not executable" in output


def initenv(installed: Installed, *argv: str) -> subprocess.CompletedProcess:
    return run([str(installed.bin("vmt-initenv.py")), *argv], timeout=120, cwd="/")


@pytest.mark.parametrize("role", ["master", "node"])
def test_the_installed_initenv_prepares_a_root_whose_unit_verifies(
    installed: Installed, tmp_path: Path, role: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    argv = ["--role", role, "--host-ip", "127.0.0.1", "--root", str(root)]
    if role == "node":
        argv += ["--master-ip", "127.0.0.1", "--token", "node-token-1"]
    dry = initenv(installed, *argv, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == "dry run: nothing was written"
    assert list(root.iterdir()) == []
    first = initenv(installed, *argv)
    assert first.returncode == 0, first.stderr
    unit_name = "volt-api.service" if role == "master" else "virtmanserver.service"
    unit = root / "etc/systemd/system" / unit_name
    # default --venv: the venv the tool runs from, since it holds the role's command
    assert f"ExecStart={installed.venv}/bin/" in unit.read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants" / unit_name).is_symlink()
    result = run(["systemd-analyze", "verify", str(unit)], timeout=120)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    config = root / ("etc/volt/volt.conf" if role == "master" else "etc/virtman/virtman.conf")
    written = config.read_bytes()
    again = initenv(installed, *argv)
    assert again.returncode == 0, again.stderr
    assert config.read_bytes() == written
    assert f"kept {config} (it sets what the arguments give)" in again.stdout


def test_the_installed_volt_api_serves_with_the_generated_credentials(
    installed: Installed, tmp_path: Path
) -> None:
    """The master's generated volt.conf, as the unit passes it (--config-file), plus a test
    override (a free port, a database in tmp_path): the admin token works, no token is 401."""
    root = tmp_path / "root"
    root.mkdir()
    made = initenv(installed, "--role", "master", "--host-ip", "127.0.0.1", "--root", str(root))
    assert made.returncode == 0, made.stderr
    config = root / "etc/volt/volt.conf"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    token = parser["auth"]["token"]
    port = free_port()
    override = tmp_path / "override.conf"
    override.write_text(
        f"[DEFAULT]\nbind_port = {port}\n[database]\n"
        f"connection = sqlite:///{tmp_path}/volt.sqlite\n"
    )
    log = (tmp_path / "volt-api.log").open("wb")
    proc = subprocess.Popen(
        [str(installed.bin("volt-api")), "--config-file", str(config), "--config-file",
         str(override)],
        stdout=log, stderr=subprocess.STDOUT, cwd="/",
    )  # fmt: skip
    log.close()
    url = f"http://127.0.0.1:{port}/v1/volumes"

    def status(headers: dict[str, str]) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5):
                return 200
        except urllib.error.HTTPError as exc:
            return exc.code

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "volt-api.log").read_text()
        try:
            return status({"X-Auth-Token": token}) == 200
        except OSError:
            return False

    try:
        wait_until(ready, timeout_s=30, what="the installed volt-api")
        assert status({}) == 401
        assert status({"X-Auth-Token": parser["auth"]["node_secret"]}) == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
