"""volt-api as a daemon: start-up checks, shutdown, eviction, metrics, no orphans."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.functional.voltproc import VoltProcess


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


def test_sigterm_stops_cleanly(volt: VoltProcess):
    assert volt.pid_file.read_text().strip() == str(volt.proc.pid)
    workers = children(volt.proc.pid)
    assert len(workers) == 1
    assert volt.stop() == 0
    assert not volt.pid_file.exists()
    assert not alive(workers[0])
    assert "volt-api stopped" in volt.log()


def test_kill_9_leaves_no_orphan_worker(volt: VoltProcess):
    [worker] = children(volt.proc.pid)
    volt.kill9()  # also waits until the port is free again
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


def run_api(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "volt.conf"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "volt.cmd.api", "--config-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_token_strategy_without_token_refuses_to_start(tmp_path):
    db = tmp_path / "v.sqlite"
    result = run_api(
        tmp_path, f"[DEFAULT]\nbind_port = 1\n[database]\nconnection = sqlite:///{db}\n"
    )
    assert result.returncode != 0
    assert "auth_strategy = token needs [auth] token" in result.stderr


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ("[auth]\ntoken = same\nnode_secret = same\n", "node_secret must differ from"),
        ("[auth]\ntoken = t\n[ssl]\ncert_file = /etc/hostname\n", "go together"),
        (
            "[auth]\ntoken = t\n[ssl]\ncert_file = /nonexistent.pem\nkey_file = /etc/hostname\n",
            "cert_file /nonexistent.pem is not a readable file",
        ),
    ],
)
def test_unsafe_auth_or_tls_settings_refuse_to_start(tmp_path, conf, message):
    db = tmp_path / "v.sqlite"
    result = run_api(
        tmp_path, f"[DEFAULT]\nbind_port = 1\n[database]\nconnection = sqlite:///{db}\n{conf}"
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_unknown_executor_refuses_to_start(tmp_path):
    result = run_api(
        tmp_path,
        "[DEFAULT]\nauth_strategy = noauth\ndefault_executor = quadtree\nbind_port = 1\n",
    )
    assert result.returncode != 0
    assert "unknown default_executor 'quadtree'" in result.stderr


def test_silent_host_is_evicted(volt_factory):
    volt = volt_factory(node_timeout=2)
    iqn = "iqn.2010-10.org.openstack:volume-a"
    for host in ("10.9.0.1", "10.9.0.2", "10.9.0.3"):
        assert volt.request("GET", "/v1/volumes/query/volume-a", {"host": host})[0] == 200
        body = {"host": host, "port": "3260", "iqn": iqn, "lun": "1"}
        assert volt.request("POST", f"/v1/volumes/volume-a/{host}:volume-a", body)[0] == 200
    status, beat = volt.request("PUT", "/v1/members/heartbeat", {"host": "10.9.0.3"})
    assert [p["peer_id"] for p in beat[0]["parents"]] == ["10.9.0.1:volume-a", "10.9.0.2:volume-a"]
    # 10.9.0.3 keeps beating, the others go silent and are evicted after ~2 s.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, beat = volt.request("PUT", "/v1/members/heartbeat", {"host": "10.9.0.3"})
        if beat[0]["parents"] == []:
            break
        time.sleep(0.3)
    assert beat == [{"peer_id": "10.9.0.3:volume-a", "parents": []}]
    status, nodes = volt.request("GET", "/v1/volumes/volume-a")
    assert status == 200
    assert [(n["peer_id"], n["depth"]) for n in nodes] == [("10.9.0.3:volume-a", 1)]
    assert "evicting host 10.9.0.1" in volt.log()


def test_metrics(volt: VoltProcess):
    for host in ("10.8.0.1", "10.8.0.2", "10.8.0.3"):
        volt.request("GET", "/v1/volumes/query/volume-m", {"host": host})
    volt.request("GET", "/v1/volumes/query/volume-m", {"host": "10.8.0.1"})
    volt.request("DELETE", "/v1/volumes/volume-m/10.8.0.3:volume-m")
    import urllib.request

    request = urllib.request.Request(volt.url + "/metrics", headers={"X-Auth-Token": volt.token})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    lines = set(text.splitlines())
    assert 'volt_nodes{volume_id="volume-m"} 2.0' in lines
    assert 'volt_placements_total{executor="balanced",result="placed"} 3.0' in lines
    assert 'volt_placements_total{executor="balanced",result="existing"} 1.0' in lines
    assert 'volt_removals_total{reason="leave"} 1.0' in lines
    query_route = 'method="GET",route="/v1/volumes/query/{volume_id}",status="200"'
    assert f"volt_requests_total{{{query_route}}} 4.0" in lines
    assert any(line.startswith("volt_request_duration_seconds_bucket{") for line in lines)


HELD = 4300  # past Granian's default of backlog / workers = 4,096 connections per worker


async def _hold_connections(port: int, token: str, count: int) -> tuple[int, list[str]]:
    """Open ``count`` keep-alive connections, one answered request each, all kept open (as
    compute nodes hold theirs); then one more connection's request. Returns how many of
    the held ones were answered, and the last connection's status line (or its failure)."""
    request = (
        f"GET /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Auth-Token: {token}\r\n\r\n"
    ).encode()
    held: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)

    async def ask() -> tuple[str, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return head.split(b"\r\n", 1)[0].decode(), writer

    async def hold() -> bool:
        async with gate:
            try:
                status, writer = await ask()
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                return False
            held.append(writer)
            return status.endswith("200 OK")

    try:
        answered = sum(await asyncio.gather(*(hold() for _ in range(count))))
        try:
            last, writer = await ask()
            held.append(writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            last = f"no answer: {exc!r}"
        return answered, [last]
    finally:
        for writer in held:
            writer.close()


def test_serves_more_held_connections_than_granians_default(volt: VoltProcess):
    """Every compute node holds a keep-alive connection: volt-api answers on 4,300 held
    connections and on one more (Granian's default left every connection past 4,096
    unanswered in the listen backlog)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HELD + 200
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this test holds {HELD} sockets; the open-file hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        assert volt.token is not None
        answered, [last] = asyncio.run(_hold_connections(volt.port, volt.token, HELD))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert answered == HELD
    assert last == "HTTP/1.1 200 OK"
