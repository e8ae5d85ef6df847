"""Start and stop a real virtmanserver (qemu driver) on 127.0.0.0/8 for functional tests.

Its own tgtd (control port from ``VMT_TEST_TGT_BASE``), qemu-storage-daemon, state and run
directories; Volt is a closed port (nothing here needs a tree).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from brick import psk
from brick.qsd import StorageDaemon
from brick.tgt import TgtAdm, TgtDaemon
from tests.functional.voltproc import free_port
from virtmanclient import Client

VIRTMANSERVER = [sys.executable, "-m", "virtman.cmd.server"]
# tgtd control ports of these daemons: 8 from VMT_TEST_TGT_BASE + 90 (above the clusters').
TGT_CONTROL_BASE = int(os.environ.get("VMT_TEST_TGT_BASE", "3400")) + 90
_instances = itertools.count()
READY = "Virtman Server Run ..."


def status_field(pid: int, name: str) -> int:
    """A number of /proc/PID/status (``VmRSS`` in kB, ``Threads``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.split()[0])
    raise KeyError(name)


class VirtmanProcess:
    """A virtmanserver whose host_ip is ``host_ip``; ``options`` are [DEFAULT] lines,
    ``sections`` other groups' (``{"vcenter": {"host": ...}}``)."""

    def __init__(
        self,
        workdir: Path,
        *,
        host_ip: str = "127.0.0.1",
        token: str | None = "test-api-token",
        sections: dict[str, dict[str, Any]] | None = None,
        **options: Any,
    ) -> None:
        self.workdir = workdir
        self.host_ip = host_ip
        self.token = token
        self.port = free_port()
        self.tgt_control_port = TGT_CONTROL_BASE + next(_instances) % 8
        self.state_dir = workdir / "state"
        self.run_dir = workdir / "run"
        self.image_dir = self.state_dir / "images"
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "virtman.log"
        self.out_path = workdir / "virtmanserver.out"
        self.config_path = workdir / "virtman.conf"
        values: dict[str, Any] = {
            "host_ip": host_ip,
            "master_ip": "127.0.0.1",
            "master_port": free_port(),  # closed: no Volt
            "master_token": "unused",
            "state_dir": self.state_dir,
            "run_dir": self.run_dir,
            "listen_port": self.port,
            "iscsi_port": free_port(),
            "nbd_port": 0,
            "tgt_control_port": self.tgt_control_port,
            "parent_wait_timeout": 5,
            "log_file": self.log_path,
        }
        if token:
            values["api_token"] = token
        # the data plane's credentials, which a node needs to start (issue 10)
        key_file = workdir / "nbd-psk" / psk.FILENAME
        key_file.parent.mkdir(mode=0o700, exist_ok=True)
        if not key_file.exists():
            psk.write_new(key_file, "vmthunder")
        values.update(
            chap_user="vmthunder", chap_password="test-chap-secret", nbd_psk_file=key_file
        )
        values.update(options)
        lines = [f"{k} = {v}" for k, v in values.items() if v is not None]
        for section, section_options in (sections or {}).items():
            lines += [f"[{section}]", *(f"{k} = {v}" for k, v in section_options.items())]
        self.config_path.write_text("[DEFAULT]\n" + "\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.scheme = "https" if "tls_cert_file" in options else "http"
        self.url = f"{self.scheme}://{host_ip}:{self.port}/RPC2"

    def spawn(self) -> subprocess.Popen[bytes]:
        out = open(self.out_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [*VIRTMANSERVER, "--config-file", str(self.config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        out.close()
        return self.proc

    def start(self, timeout: float = 60.0) -> VirtmanProcess:
        offset = self.out_path.stat().st_size if self.out_path.exists() else 0
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"virtmanserver exited {proc.returncode}:\n{self.logs()}")
            if READY in self.out_path.read_text(errors="replace")[offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"virtmanserver not ready in {timeout} s:\n{self.logs()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def logs(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in (self.out_path, self.log_path) if p.exists()
        )

    def client(self, token: str | None = None, **kwargs: Any) -> Client:
        return Client(self.url, token=self.token if token is None else token, **kwargs)

    def tgt_targets(self) -> list[tuple[str, list[str]]]:
        """(IQN, backing files) of every target of this node's tgtd."""
        return [
            (t.iqn, [lun.backing_path for lun in t.luns])
            for t in TgtAdm(self.tgt_control_port).targets()
        ]

    def files(self) -> dict[str, tuple[int, int]]:
        """(size, mtime_ns) of every file under the state and run directories (sockets and
        pid files included: what the daemon made); only the size of the FUSE exports, whose
        times qemu-storage-daemon reports as it likes."""
        found = {}
        exports = self.run_dir / "exports"
        for top in (self.state_dir, self.run_dir):
            for path in sorted(top.rglob("*")):
                info = path.lstat()
                fuse = path.parent == exports
                found[str(path)] = (info.st_size, 0 if fuse else info.st_mtime_ns)
        return found

    def state(self) -> dict[str, Any]:
        """Everything a call could change, read without going through the API's auth."""
        client = self.client()
        return {
            "list": client.list(),
            "targets": client.list_image_target(),
            "tgt": self.tgt_targets(),
            "files": self.files(),
        }

    def raw(self, request: bytes, timeout: float = 10.0) -> bytes:
        """Send raw bytes on a fresh plain connection; everything answered until close."""
        with socket.create_connection((self.host_ip, self.port), timeout=timeout) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def stop(self) -> int:
        """Remove every image target and instance left, then SIGTERM and wait."""
        assert self.proc is not None
        if self.proc.poll() is None:
            try:
                client = self.client()
                for image in client.list_image_target():
                    client.destroy_image_target(image)
                for entry in client.list():
                    client.destroy(entry.partition(":")[0])
            except Exception as exc:  # stop it anyway
                print(f"virtmanserver: could not empty it: {exc}", file=sys.stderr)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"virtmanserver: no exit 60 s after SIGTERM:\n{self.logs()[-8000:]}")
                self.proc.kill()
                self.proc.wait()
                self.reap()
        return self.proc.returncode

    def reap(self) -> None:
        """Stop the daemons a killed virtmanserver left (its tgtd and qemu-storage-daemon,
        by their pidfiles), so that one failed test does not leave its tgtd control port
        taken for the tests after it."""
        run_dir = self.run_dir.resolve()
        TgtDaemon(self.tgt_control_port, ["127.0.0.1:3260"], run_dir=run_dir).stop()
        StorageDaemon("virtman-qsd", run_dir).stop()
