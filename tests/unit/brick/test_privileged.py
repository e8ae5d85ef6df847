"""brick/privileged: the allow-list, a real privsep daemon (forked: these tests run as root),
and a scan proving no product code starts a process outside brick/executor.py and
brick/privileged/."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import brick.privileged
import brick.privileged.process as process
import brick.privileged.sysfs as sysfs
from brick.exception import CommandFailed, NotPermitted
from brick.executor import execute

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
PRODUCT = ("brick", "virtman", "volt", "voltclient", "virtmanclient")
# The only modules that may start a process: the unprivileged runner and the entry points.
RUNNERS = {"brick/executor.py", "brick/privileged/process.py"}
# Known call sites still outside (each with its reason); a new one fails the scan.
EXEMPT = {
    "brick/daemon.py": "Popen of supervised daemons (tgtd, qsd, libvirtd): the child is ours",
    "brick/netns.py": "Popen of lab processes inside a test namespace (Host.spawn)",
}
SPAWNING = {
    "subprocess": {"run", "Popen", "call", "check_call", "check_output", "getoutput"},
    "os": {
        "system", "popen", "execv", "execve", "execvp", "execvpe", "execl", "execlp",
        "spawnv", "spawnvp", "posix_spawn", "posix_spawnp", "setns", "unshare",
    },
}  # fmt: skip


def spawning_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and node.func.attr in SPAWNING.get(owner.id, ()):
                found.append(f"{owner.id}.{node.func.attr} line {node.lineno}")
        if isinstance(node, ast.ImportFrom) and node.module in SPAWNING:
            for alias in node.names:
                if alias.name in SPAWNING[node.module]:
                    found.append(f"from {node.module} import {alias.name}")
    return found


def test_no_product_code_starts_a_process_outside_the_runners() -> None:
    sites = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            calls = spawning_calls(path)
            if calls:
                sites[rel] = calls
    bypass = {f: c for f, c in sites.items() if f not in RUNNERS | set(EXEMPT)}
    assert not bypass, f"run commands through brick.executor / brick.privileged: {bypass}"
    assert set(sites) >= RUNNERS, "the scan no longer sees the runners: is it still working?"
    assert set(EXEMPT) <= set(sites), "an exemption is stale: remove it"


def test_scan_sees_a_bypass(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\nsubprocess.Popen(['x'])\nos.system('y')\n")
    assert spawning_calls(bad) == ["subprocess.Popen line 2", "os.system line 3"]


@pytest.mark.parametrize(
    "argv",
    [
        ["rm", "-rf", "/"],
        ["/usr/sbin/dmsetup", "ls"],  # a path, not an allow-listed name
        ["xargs", "rm"],
        ["tee", "-a", "/etc/passwd"],
        ["nsenter", "--net=/var/run/netns/x", "sh", "-c", "id"],
        ["nsenter", "--target=1", "--mount", "dmsetup", "ls"],
        ["fusermount3", "-u", "relative"],
    ],
)
def test_allow_list_refuses(argv: list[str]) -> None:
    with pytest.raises(NotPermitted):
        process.check_argv(argv)


def test_allow_list_accepts() -> None:
    process.check_argv(["nsenter", "--net=/var/run/netns/lab-1", "ip", "addr"])
    process.check_argv(["tee", "-a", "/sys/block/sdb/device/delete"])
    process.check_argv(["xargs", "-0", "-r", "iscsiadm", "-m", "node"])
    assert not process.needs_root(["qemu-img", "info", "x"])


def test_not_permitted_survives_the_wire() -> None:
    err = NotPermitted("execute_root", "rm", "not allowed")
    again = type(err)(*err.args)  # what the privsep client does with (class path, args)
    assert str(again) == str(err) == "execute_root refused 'rm': not allowed"


@pytest.fixture
def privsep() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.fail("the privsep tests fork a root daemon: run the unit tests as root")
    brick.privileged.start()
    try:
        yield
    finally:
        brick.privileged.stop()


def test_entry_point_runs_in_the_daemon(privsep: None) -> None:
    assert brick.privileged.enabled()
    who = process.whoami()
    assert who["pid"] != os.getpid()
    assert who["uid"] == 0
    assert set(who["capabilities"]) == set(brick.privileged.describe())  # type: ignore[arg-type]
    # an allow-listed command runs there and its result comes back
    out = execute(["ip", "-o", "link", "show", "lo"]).stdout
    assert "lo" in out
    with pytest.raises(CommandFailed):
        execute(["ip", "link", "show", "no-such-link-vmtj"])


def test_daemon_refuses_outside_the_allow_list(privsep: None) -> None:
    with pytest.raises(NotPermitted, match="not an allow-listed root command"):
        process.execute_root(["rm", "-rf", "/tmp/nothing"], None, 5.0, None)
    with pytest.raises(NotPermitted, match="allow-listed"):
        execute(["nsenter", "--net=/var/run/netns/vmtj", "sh", "-c", "id"])
    with pytest.raises(NotPermitted, match="not an allow-listed kernel knob"):
        sysfs.write_knob("/proc/sys/kernel/panic", "1")
    # a command that needs no root still runs here, unprivileged
    assert execute(["echo", "here"]).stdout == "here\n"
