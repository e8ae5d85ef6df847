"""Start and stop a real volt-api process for functional tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from brick.net import wait_port_free

VOLT_API = [sys.executable, "-m", "volt.cmd.api"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VoltProcess:
    """A volt-api on 127.0.0.1 with its own config, SQLite file and log."""

    def __init__(
        self,
        workdir: Path,
        *,
        token: str | None = "test-token",
        ca_file: Path | None = None,
        **options: Any,
    ):
        """``options``: volt.conf values, ``group__name=value``; with ``ssl__cert_file`` the
        URL is https and requests trust ``ca_file``."""
        self.workdir = workdir
        self.token = token
        self.port = free_port()
        scheme = "https" if "ssl__cert_file" in options else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.ssl_context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.log_path = workdir / "volt-api.log"
        self.pid_file = workdir / "volt-api.pid"
        self.config_path = workdir / "volt.conf"
        default = {
            "bind_host": "127.0.0.1",
            "bind_port": str(self.port),
            "auth_strategy": "token" if token else "noauth",
            "pid_file": str(self.pid_file),
        }
        groups: dict[str, dict[str, str]] = {"DEFAULT": default, "auth": {}, "database": {}}
        if token:
            groups["auth"]["token"] = token
        groups["database"]["connection"] = f"sqlite:///{workdir / 'volt.sqlite'}"
        for key, value in options.items():
            group, _, name = key.rpartition("__")
            groups.setdefault(group or "DEFAULT", {})[name] = str(value)
        lines = []
        for group, values in groups.items():
            lines.append(f"[{group}]")
            lines.extend(f"{k} = {v}" for k, v in values.items())
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> VoltProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [*VOLT_API, "--config-file", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"volt-api exited {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = self.request("GET", "/v1/volumes")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"volt-api not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        source: str | None = None,
    ) -> tuple[int, Any]:
        """One HTTP request; returns (status, parsed JSON body or None)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"}
        token = self.token if token is None else token
        if token:
            headers["X-Auth-Token"] = token
        if source is not None:
            return _request_from(source, self.port, method, path, data, headers)
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl_context) as resp:
                return resp.status, _parse(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, _parse(err.read())

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        wait_port_free(self.port)


def _parse(raw: bytes) -> Any:
    return json.loads(raw) if raw else None


def _request_from(
    source: str, port: int, method: str, path: str, data: bytes | None, headers: dict[str, str]
) -> tuple[int, Any]:
    """A request whose TCP source address is ``source`` (an address in 127.0.0.0/8)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, _parse(resp.read())
    finally:
        conn.close()
