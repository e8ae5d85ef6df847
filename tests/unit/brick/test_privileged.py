"""brick/privileged: the allow-lists, a real privsep daemon (forked, and through the
``privsep-helper`` launch: these tests run as root), bounded start-up errors, and a scan
proving no product code starts a process outside the runners named below."""

from __future__ import annotations

import ast
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from oslo_config import cfg
from oslo_privsep import priv_context

import brick.privileged
import brick.privileged.process as process
import brick.privileged.sysfs as sysfs
from brick.daemon import Supervisor
from brick.exception import CommandFailed, NotPermitted
from brick.executor import execute
from brick.wait import wait_until
from virtman.drivers.dm.bcache import BcacheSysfs

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
PRODUCT = ("brick", "virtman", "volt", "voltclient", "virtmanclient")
# The only modules that may start a process: the entry points, the launch of their daemon
# (the privsep helper), and the two runners that hand ROOT_COMMANDS / ROOT_DAEMONS to them
# when privsep is on and run everything else in the caller, unprivileged.
RUNNERS = {
    "brick/privileged/process.py": "execute_root and spawn_root: the allow-listed root work",
    "brick/privileged/__init__.py": "runs [brick_privsep] helper_command (Method.ROOTWRAP)",
    "brick/executor.py": "commands: ROOT_COMMANDS go to execute_root when privsep is on",
    "brick/daemon.py": "Supervisor.spawn: ROOT_DAEMONS (tgtd) go to spawn_root when privsep "
    "is on; other daemons (none in virtman today) start here, with our own privileges",
}
# Known call sites outside the runners (each with its reason); a new one fails the scan.
EXEMPT = {
    "brick/netns.py": "Host.spawn of the lab harness (tests, vmt-demo, bench; run as root by "
    "whoever sets up the lab): nsenter into a lab namespace. virtmanserver never imports it.",
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
    bypass = {f: c for f, c in sites.items() if f not in set(RUNNERS) | set(EXEMPT)}
    assert not bypass, f"run commands through brick.executor / brick.privileged: {bypass}"
    assert set(sites) >= set(RUNNERS), "the scan no longer sees the runners: still working?"
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
    # the privsep channel turns lists into tuples: every rule holds for those too
    for argv in (
        ["fusermount3", "-u", "-z", "/run/x/exports/a.raw"],
        ["tee", "-a", "/sys/block/sdb/device/delete"],
        ["xargs", "-0", "-r", "iscsiadm", "-m", "node"],
        ["nsenter", "--net=/var/run/netns/lab-1", "fusermount3", "-u", "-z", "/m"],
        ["udevadm", "settle"],
    ):
        process.check_argv(tuple(argv))
        process.check_argv(argv)
    process.check_daemon_argv(tuple(TGTD))


TGTD = ["tgtd", "-f", "-C", "3490", "--iscsi", "portal=127.0.0.1:3260,portal=[::1]:3260"]


def test_daemon_allow_list() -> None:
    process.check_daemon_argv(TGTD)
    process.check_daemon_argv(["nsenter", "--net=/var/run/netns/lab-1", *TGTD])
    assert process.is_root_daemon(["nsenter", "--net=/var/run/netns/lab-1", *TGTD])
    assert not process.is_root_daemon(["sleep", "1"])
    for argv in (
        ["sleep", "1"],
        ["tgtd", "-f", "-C", "3490", "--iscsi", "portal=1.2.3.4:3260;reboot"],
        ["tgtd", "-C", "3490", "--iscsi", "portal=1.2.3.4:3260"],
        [*TGTD, "--debug", "1"],
        ["tgtd", "-f", "-C", "\uff13", "--iscsi", "portal=1.2.3.4:3260"],  # a Unicode digit
        ["nsenter", "--target=1", *TGTD],
        ["nsenter", "--net=/var/run/netns/x", "sh", "-c", "tgtd"],
    ):
        with pytest.raises(NotPermitted):
            process.check_daemon_argv(argv)


SET = "0f8fad5b-d9cb-469f-a165-70867728950e"


def test_every_bcache_write_is_an_allow_listed_knob() -> None:
    """Each knob BcacheSysfs writes, with the value it writes, passes ``check_knob``, and
    goes through the privileged entry point by default."""
    written: list[tuple[str, str]] = []
    bc = BcacheSysfs("/sys", write=lambda path, value: written.append((path, value)))
    bc.register("/dev/mapper/vmt_cacheset")
    bc.register("/dev/mapper/cachebk_cirros-0.6.img")
    bc.attach("dm-3", SET)
    bc.detach("dm-3")
    bc.stop("dm-12")
    bc.tune_backing("dm-3")
    bc.tune_set(SET)
    bc.unregister_set(SET)
    assert len(written) == 9
    for path, value in written:
        sysfs.check_knob(path, value)
    assert BcacheSysfs().write is sysfs.write_knob


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("/sys/fs/bcache/register_quiet", "/dev/sda"),  # not a device of ours
        ("/sys/fs/bcache/register_quiet", "/dev/mapper/cachebk_../../sda"),
        ("/sys/fs/bcache/register", "/dev/mapper/vmt_cacheset"),  # not register_quiet
        ("/sys/block/dm-3/bcache/attach", "not-a-uuid"),
        ("/sys/block/sda/bcache/stop", "1"),  # not a dm device
        ("/sys/block/dm-3/bcache/../../sda/bcache/stop", "1"),
        ("/sys/block/dm-3/bcache/sequential_cutoff", "4096"),
        ("/sys/block/dm-3/bcache/cache_mode", "writeback"),
        (f"/sys/fs/bcache/{SET}/stop", "1"),
        (f"/sys/fs/bcache/{SET}/congested_read_threshold_us", "2000"),
        (f"/sys/fs/bcache/{SET.upper()}/unregister", "1"),
        ("/sys/class/bdi/0:52/read_ahead_kb", "1\n2"),
    ],
)
def test_knob_allow_list_refuses(path: str, value: str) -> None:
    with pytest.raises(NotPermitted):
        sysfs.check_knob(path, value)


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
    # an allow-listed command runs there (the daemon counts it) and its result comes back
    out = execute(["ip", "-o", "link", "show", "lo"]).stdout
    assert "lo" in out
    with pytest.raises(CommandFailed):
        execute(["ip", "link", "show", "no-such-link-vmtj"])
    assert process.whoami()["executed"] == who["executed"] + 2  # type: ignore[operator]
    # a command that needs no root runs here: the daemon's count does not move
    execute(["true"])
    assert process.whoami()["executed"] == who["executed"] + 2  # type: ignore[operator]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def test_root_daemon_is_spawned_by_the_privsep_daemon(privsep: None, tmp_path: Path) -> None:
    """Supervisor.spawn hands an allow-listed daemon to spawn_root: its parent is the privsep
    daemon, which reaps it and reports its exit code."""
    port = int(os.environ.get("VMT_TEST_TGT_BASE", "3400")) + 99  # no functional test uses it
    argv = ["tgtd", "-f", "-C", str(port), "--iscsi", f"portal=127.0.0.1:{free_port()}"]
    sup = Supervisor("tgtd", tmp_path / "tgtd.pid", lambda a: Path(a[0]).name == "tgtd")
    pid = sup.spawn(argv, log=tmp_path / "tgtd.log", ready=sup.alive, timeout_s=10)
    try:
        assert sup.child is None  # not our child: the daemon's
        assert parent_of(pid) == process.whoami()["pid"]
        assert process.spawned_exit(pid) is None
    finally:
        sup.stop(timeout_s=0.5)  # SIGTERM, then SIGKILL (a running tgtd ignores SIGTERM)
    # reaped by the privsep daemon, which reports the signal (SIGTERM if tgtd was still
    # starting, else SIGKILL)
    code = wait_until(lambda: process.spawned_exit(pid), timeout_s=5, what="the exit")
    assert code in (-15, -9)
    with pytest.raises(NotPermitted, match="log_path"):
        process.spawn_root(argv, "/etc/passwd", None)
    with pytest.raises(NotPermitted, match="root daemon"):
        process.spawn_root(["sleep", "1"], str(tmp_path / "x.log"), None)


@pytest.fixture
def helper_command() -> Iterator[None]:
    yield
    cfg.CONF.clear_override("helper_command", group=brick.privileged.CFG_SECTION)


@pytest.mark.parametrize(
    ("helper", "reason"),
    [
        ("/nonexistent/privsep-helper", "is not on PATH"),
        ("false", "false exited with 1"),
        ("true", "did not connect within 2 s"),  # exits 0, no daemon ever connects
        ("sh -c 'sleep 30'", "still runs after 2 s"),  # a sudo asking for a password
    ],
)
def test_start_fails_clearly_not_hangs(helper_command: None, helper: str, reason: str) -> None:
    cfg.CONF.set_override("helper_command", helper, group=brick.privileged.CFG_SECTION)
    started = time.monotonic()
    with pytest.raises(brick.privileged.PrivsepUnavailable, match=reason):
        brick.privileged.start(priv_context.Method.ROOTWRAP, timeout_s=2)
    assert time.monotonic() - started < 5
    assert not brick.privileged.enabled()


def test_start_through_privsep_helper(helper_command: None) -> None:
    """The launch a non-root virtmanserver uses: oslo.privsep's privsep-helper (run directly
    here, as root, instead of through sudo)."""
    helper = Path(sys.executable).parent / "privsep-helper"
    cfg.CONF.set_override("helper_command", str(helper), group=brick.privileged.CFG_SECTION)
    brick.privileged.start(priv_context.Method.ROOTWRAP, timeout_s=20)
    try:
        who = process.whoami()
        assert who["pid"] != os.getpid()
        assert set(who["capabilities"]) == set(brick.privileged.describe())  # type: ignore[arg-type]
        assert "lo" in execute(["ip", "-o", "link", "show", "lo"]).stdout
    finally:
        brick.privileged.stop()


def test_daemon_refuses_outside_the_allow_list(privsep: None) -> None:
    with pytest.raises(NotPermitted, match="not an allow-listed root command"):
        process.execute_root(["rm", "-rf", "/tmp/nothing"], None, 5.0, None)
    with pytest.raises(NotPermitted, match="allow-listed"):
        execute(["nsenter", "--net=/var/run/netns/vmtj", "sh", "-c", "id"])
    with pytest.raises(NotPermitted, match="not an allow-listed kernel knob"):
        sysfs.write_knob("/proc/sys/kernel/panic", "1")
    # a command that needs no root still runs here, unprivileged
    assert execute(["echo", "here"]).stdout == "here\n"


def test_virtmanserver_stops_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """virtmanserver with privsep = true and no daemon: SystemExit naming the cause and the
    ways out, before it serves anything."""
    import virtman.cmd.server as server

    def fail(*_args: object, **_kwargs: object) -> None:
        raise brick.privileged.PrivsepUnavailable("ROOTWRAP", "'sudo' is not on PATH")

    monkeypatch.setattr(brick.privileged, "start", fail)
    with pytest.raises(SystemExit) as stop:
        server.start_privsep()
    message = str(stop.value)
    assert message.startswith("virtmanserver: privsep daemon (ROOTWRAP) did not start: ")
    assert "'sudo' is not on PATH" in message and "privsep = false" in message


def test_privsep_is_on_by_default() -> None:
    import virtman.conf

    (opt,) = [o for o in virtman.conf.default_opts if o.name == "privsep"]
    assert opt.default is True
