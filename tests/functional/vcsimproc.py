"""Start and stop govmomi's vCenter simulator (``tools/vcsim``, built by ``tools/setup.sh``)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import urllib.request
from pathlib import Path

from brick.wait import wait_until
from tests.functional.voltproc import free_port

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".work" / "bin" / "vmt-vcsim"
USERNAME = "vmt-admin"


class VCSim:
    """One simulator on 127.0.0.1 on a free port, its own random password, a pidfile; stopped
    by the PID it wrote (SIGTERM, then SIGKILL after 5 s). ``fail_create_every`` N > 0: while
    armed (``faults(True)``), every Nth ``CreateVM_Task`` fails as a task
    (``InsufficientResourcesFault``)."""

    def __init__(
        self, workdir: Path, *, cluster_hosts: int = 3, fail_create_every: int = 0
    ) -> None:
        if not BINARY.is_file():
            raise RuntimeError(f"{BINARY} missing: run tools/setup.sh (tools/vcsim/build.sh)")
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.username = USERNAME
        self.password = secrets.token_hex(12)
        self.pidfile = workdir / "vcsim.pid"
        self.log_path = workdir / "vcsim.log"
        self.cluster_hosts = cluster_hosts
        self.fail_create_every = fail_create_every
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> VCSim:
        env = dict(os.environ, VMT_VCSIM_USERNAME=self.username, VMT_VCSIM_PASSWORD=self.password)
        argv = [
            str(BINARY),
            "-listen", f"{self.host}:{self.port}",
            "-pidfile", str(self.pidfile),
            "-cluster-hosts", str(self.cluster_hosts),
            "-fail-create-every", str(self.fail_create_every),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"vmt-vcsim exited: {self.log_path.read_text()}")
            return self.pidfile.exists() and self._answers()

        try:
            wait_until(ready, timeout_s=timeout_s, what=f"vmt-vcsim on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/about", timeout=1):
                return True
        except OSError:
            return False

    def faults(self, armed: bool) -> None:
        """Arm (the count starts again) or disarm the fault injection; returns once the
        simulator says it did."""
        assert self.proc is not None and self.fail_create_every > 0
        word = "armed" if armed else "disarmed"
        before = self.log_path.read_text().count(f"faults {word}\n")
        os.kill(self.proc.pid, signal.SIGUSR1 if armed else signal.SIGUSR2)
        wait_until(
            lambda: self.log_path.read_text().count(f"faults {word}\n") > before,
            timeout_s=5, what=f"vmt-vcsim faults {word}", max_interval_s=0.02,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def stop(self) -> None:
        """End the simulator by the PID it wrote (the process we started); idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            pid = self.pid if self.pidfile.exists() else self.proc.pid
            assert pid == self.proc.pid, f"pidfile {pid} is not our child {self.proc.pid}"
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self.pidfile.unlink(missing_ok=True)
        self.proc = None
