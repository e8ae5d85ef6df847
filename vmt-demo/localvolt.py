"""Run a private volt-api on 127.0.0.1 for demos: its own config, store, log and pid file."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

from brick.wait import wait_until
from voltclient import Client
from voltclient.exceptions import VoltClientError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalVolt:
    def __init__(self, workdir: Path, *, executor: str = "balanced", node_timeout: int = 60):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.pid_file = workdir / "volt-api.pid"
        self.log_file = workdir / "volt-api.log"
        self.config = workdir / "volt.conf"
        self.config.write_text(
            "[DEFAULT]\n"
            "bind_host = 127.0.0.1\n"
            f"bind_port = {self.port}\n"
            f"default_executor = {executor}\n"
            f"node_timeout = {node_timeout}\n"
            f"pid_file = {self.pid_file}\n"
            f"log_file = {self.log_file}\n"
            "[auth]\n"
            f"token = {self.token}\n"
            "[database]\n"
            f"connection = sqlite:///{workdir / 'volt.sqlite'}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def client(self) -> Client:
        return Client(self.url, token=self.token, timeout=10)

    def start(self, timeout_s: float = 30.0) -> LocalVolt:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "volt.cmd.api", "--config-file", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        client = self.client()
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"volt-api exited {proc.returncode}: {err}")
            try:
                client.volumes.list()
            except VoltClientError:
                return False
            return True

        wait_until(answers, timeout_s=timeout_s, what="volt-api's answer", interval_s=0.05)
        return self

    def stop(self) -> int:
        """SIGTERM to the process we started (by PID), then wait for it."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
