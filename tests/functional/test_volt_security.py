"""Issue 10, Volt's findings 3 and 5, replayed against a real volt-api on 127.0.0.1.

Finding 3: any token holder could register, leave or heartbeat as any host. Now each node has
its own token bound to its host; every spoofing attempt is refused (403) with nothing changed.
Finding 5: four stalled bodies froze volt-api and the evictor then evicted healthy hosts. Now
bodies are read only after authentication with a deadline, and saturation suspends eviction.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.functional.voltproc import VoltProcess
from virtman.voltlink import VoltLink
from volt.auth import node_token
from voltclient import Client, shell
from voltclient import exceptions as exc

SECRET = "cluster-node-secret"
VOLUME = "volume-sec"
TARGET = {"port": 3260, "iqn": "iqn.2010-10.org.openstack:volume-sec", "lun": 1}
A, B, C = "10.10.0.1", "10.10.0.2", "10.10.0.3"
MANAGE = [sys.executable, "-m", "volt.cmd.manage"]
OPENSSL_REQ = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]


def tok(host: str) -> str:
    return node_token(SECRET, host)


def state(volt: VoltProcess) -> tuple[Any, Any, Any]:
    """The tree, the members (without their clocks) and the tree list, read as admin."""
    status, tree = volt.request("GET", f"/v1/volumes/{VOLUME}")
    assert status == 200, tree
    status, members = volt.request("GET", "/v1/members")
    assert status == 200, members
    for m in members:
        del m["seconds_since_heartbeat"]
    return tree, members, volt.request("GET", "/v1/volumes")[1]


def forbidden(answer: tuple[int, Any], fragment: str) -> None:
    status, body = answer
    assert status == 403, answer
    (error,) = body["errors"]
    assert error["code"] == "volt.auth.forbidden", error
    assert fragment in error["detail"], error


@pytest.fixture
def secured(volt_factory) -> VoltProcess:
    return volt_factory(auth__node_secret=SECRET)


def join(volt: VoltProcess, host: str) -> None:
    """The node's own cycle with its own token: query, register (no host: the token's)."""
    status, placed = volt.request("GET", f"/v1/volumes/query/{VOLUME}", token=tok(host))
    assert status == 200 and placed["peer_id"] == f"{host}:{VOLUME}", placed
    path = f"/v1/volumes/{VOLUME}/{host}:{VOLUME}"
    status, node = volt.request("POST", path, TARGET, token=tok(host))
    assert status == 200 and node["host"] == host and node["status"] == "OK", node


def test_issue_10_node_token_cannot_act_for_another_host(secured: VoltProcess) -> None:
    volt = secured
    for host in (B, C, A):
        join(volt, host)
    status, b_parents = volt.request("PUT", "/v1/members/heartbeat", token=tok(B))
    assert status == 200 and b_parents[0]["peer_id"] == f"{B}:{VOLUME}", b_parents
    before = state(volt)

    a = tok(A)
    b_peer = f"/v1/volumes/{VOLUME}/{B}:{VOLUME}"
    attempts = {
        "query as B": ("GET", f"/v1/volumes/query/{VOLUME}", {"host": B}, "host '10.10.0.2'"),
        "query B's peer id": (
            "GET",
            f"/v1/volumes/query/{VOLUME}",
            {"peer_id": f"{B}:{VOLUME}"},
            "peer_id host",
        ),
        "register B's node": ("POST", b_peer, {"host": A, **TARGET}, "peer_id host"),
        "register B's address": (
            "POST",
            f"/v1/volumes/{VOLUME}/{A}:{VOLUME}",
            {"host": B, **TARGET},
            "host '10.10.0.2'",
        ),
        "heartbeat as B": ("PUT", "/v1/members/heartbeat", {"host": B}, "host '10.10.0.2'"),
        "remove B's node": ("DELETE", b_peer, None, "peer_id host"),
        "delete the tree": ("DELETE", f"/v1/volumes/{VOLUME}", None, "admin credential"),
        "read the tree": ("GET", f"/v1/volumes/{VOLUME}", None, "admin credential"),
        "read all members": ("GET", "/v1/members", None, "admin credential"),
    }
    for name, (method, path, body, fragment) in attempts.items():
        answer = volt.request(method, path, body, token=a)
        try:
            forbidden(answer, fragment)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
    status, _ = volt.request("HEAD", f"/v1/volumes/{VOLUME}", token=a)
    assert status == 403

    # A token whose host was changed, or made with another secret, is no credential.
    digest = a.rpartition(":")[2]
    for forged in (f"node:{B}:{digest}", node_token("another-secret", B), "node:" + B):
        status, body = volt.request("PUT", "/v1/members/heartbeat", token=forged)
        assert status == 401 and body["errors"][0]["code"] == "volt.unauthenticated"

    assert state(volt) == before
    status, b_after = volt.request("PUT", "/v1/members/heartbeat", token=tok(B))
    assert (status, b_after) == (200, b_parents)
    # The admin still does everything, for any host.
    status, _ = volt.request("DELETE", b_peer)
    assert status == 200
    assert volt.request("DELETE", f"/v1/volumes/{VOLUME}")[0] == 200


def test_issue_10_node_token_does_its_own_host_cycle(secured: VoltProcess) -> None:
    volt = secured
    join(volt, A)
    status, beats = volt.request("PUT", "/v1/members/heartbeat", {"host": A}, token=tok(A))
    assert status == 200 and [b["peer_id"] for b in beats] == [f"{A}:{VOLUME}"]
    status, _ = volt.request("DELETE", f"/v1/volumes/{VOLUME}/{A}:{VOLUME}", token=tok(A))
    assert status == 200
    assert volt.request("GET", "/v1/volumes")[1] == []
    # A node token of an IPv6 host: the same checks on the canonical form.
    six = node_token(SECRET, "fd00:0::7")
    status, placed = volt.request("GET", f"/v1/volumes/query/{VOLUME}", token=six)
    assert status == 200 and placed["peer_id"] == f"[fd00::7]:{VOLUME}"


def test_issue_10_volt_manage_issues_the_node_token(secured: VoltProcess) -> None:
    out = subprocess.run(
        [*MANAGE, "--config-file", str(secured.config_path), "node-token", A],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == tok(A) and re.fullmatch(r"node:10\.10\.0\.1:[0-9a-f]{64}", out)
    status, _ = secured.request("GET", f"/v1/volumes/query/{VOLUME}", token=out)
    assert status == 200


def get(volt: VoltProcess, path: str, token: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", volt.port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-Auth-Token": token} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_issue_10_metrics_needs_a_credential(volt_factory) -> None:
    volt = volt_factory(auth__node_secret=SECRET)
    status, body = get(volt, "/metrics", None)
    assert status == 401 and b'"volt.unauthenticated"' in body
    assert get(volt, "/metrics", "node:" + A)[0] == 401
    for token in (str(volt.token), tok(A)):
        status, body = get(volt, "/metrics", token)
        assert status == 200 and b"volt_requests_total" in body
    assert get(volt, "/", None)[0] == 300
    assert get(volt, "/openapi.json", None)[0] == 200
    public = volt_factory(metrics_public="true")
    status, body = get(public, "/metrics", None)
    assert status == 200 and b"volt_requests_total" in body


# -- finding 5: stalled bodies ---------------------------------------------------------------
def stall(volt: VoltProcess, method: str, path: str, token: str | None = None) -> socket.socket:
    """Headers announcing a 100-byte body, then nothing."""
    s = socket.create_connection(("127.0.0.1", volt.port), timeout=15)
    head = f"{method} {path} HTTP/1.1\r\nHost: volt\r\nContent-Length: 100\r\n"
    if token:
        head += f"X-Auth-Token: {token}\r\n"
    s.sendall((head + "\r\n").encode())
    return s


def answer_of(s: socket.socket) -> tuple[int, bool, float]:
    """(status, whether the server closed the connection after it, seconds waited)."""
    started = time.monotonic()
    data = b""
    closed = False
    try:
        while chunk := s.recv(65536):
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head, re.I)
            if sep and length and len(body) >= int(length.group(1)):
                s.settimeout(1.0)  # answered: does the server close now?
        closed = True
    except TimeoutError:
        pass
    finally:
        s.close()
    waited = time.monotonic() - started
    return int(data.split(b" ", 2)[1]) if data else 0, closed, waited


class Heartbeats(threading.Thread):
    """``count`` simulated nodes, each with its node token, heartbeating every second."""

    def __init__(self, volt: VoltProcess, count: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.volt, self.timeout = volt, timeout
        self.hosts = [f"10.20.{i // 200}.{i % 200 + 1}" for i in range(count)]
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def join_all(self) -> None:
        for host in self.hosts:
            status, _ = self.volt.request("GET", f"/v1/volumes/query/{VOLUME}", token=tok(host))
            assert status == 200

    def beat(self, conn: http.client.HTTPConnection, host: str) -> None:
        started = time.monotonic()
        try:
            headers = {"X-Auth-Token": tok(host), "Content-Type": "application/json"}
            conn.request("PUT", "/v1/members/heartbeat", f'{{"host": "{host}"}}', headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                self.failures.append(f"{host}: {resp.status}")
        except OSError as err:
            self.failures.append(f"{host}: {err!r}")
            conn.close()
        self.latencies.append(time.monotonic() - started)

    def run(self) -> None:
        conns = [
            http.client.HTTPConnection("127.0.0.1", self.volt.port, timeout=self.timeout)
            for _ in range(4)
        ]
        while not self.stop.is_set():
            second = time.monotonic() + 1.0
            for i, host in enumerate(self.hosts):
                self.beat(conns[i % 4], host)
            self.stop.wait(max(0.0, second - time.monotonic()))


def evictions(volt: VoltProcess) -> float:
    text = get(volt, "/metrics", str(volt.token))[1].decode()
    match = re.search(r"^volt_evicted_hosts_total (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_issue_10_stalled_bodies_while_100_nodes_heartbeat(volt_factory) -> None:
    volt = volt_factory(auth__node_secret=SECRET, node_timeout=4, request_body_timeout=2)
    nodes = Heartbeats(volt, 100, timeout=3.0)
    nodes.join_all()
    nodes.start()
    try:
        time.sleep(1.5)
        # Without a credential: answered at once, no body read, the connection dropped.
        for _ in range(5):
            opened = [
                stall(volt, "GET", "/metrics"),
                stall(volt, "GET", "/"),
                stall(volt, "GET", "/openapi.json"),
                stall(volt, "PUT", "/v1/members/heartbeat"),
                stall(volt, "GET", f"/v1/volumes/query/{VOLUME}", token="wrong"),
            ]
            answers = [answer_of(s) for s in opened]
            assert [a[0] for a in answers] == [401, 300, 200, 401, 401], answers
            assert all(closed and waited < 1.5 for _, closed, waited in answers), answers
        # With a credential, on a route that reads a body: 408 after the deadline, and the
        # connection is dropped.
        status, closed, waited = answer_of(stall(volt, "PUT", "/v1/members/heartbeat", tok(A)))
        assert status == 408 and closed and 1.5 < waited < 3.0, (status, closed, waited)
        time.sleep(1.0)
    finally:
        nodes.stop.set()
        nodes.join()
    assert not nodes.failures, nodes.failures[:10]
    assert max(nodes.latencies) < 3.0, max(nodes.latencies)
    assert len(nodes.latencies) >= 300, len(nodes.latencies)
    assert evictions(volt) == 0
    assert len(volt.request("GET", "/v1/members")[1]) == 100


def test_issue_10_saturated_workers_do_not_cause_evictions(volt_factory) -> None:
    """Eight authenticated clients stalling their bodies again and again for twice
    node_timeout (the issue froze volt-api with four): nothing waits for them but the event
    loop's timers, each gets its 408 at the deadline with its connection closed, the
    heartbeats (sent one at a time, the slowest client) keep getting prompt answers, and
    nobody is evicted."""
    volt = volt_factory(auth__node_secret=SECRET, node_timeout=4, request_body_timeout=2)
    nodes = Heartbeats(volt, 100, timeout=3.0)
    nodes.join_all()
    nodes.start()
    answered: list[tuple[int, bool, float]] = []

    def attack(host: str, until: float) -> None:
        """Keep one worker thread busy with a stalled body, again and again."""
        while time.monotonic() < until:
            answered.append(answer_of(stall(volt, "PUT", "/v1/members/heartbeat", tok(host))))

    try:
        time.sleep(1.5)
        until = time.monotonic() + 8.0
        slots = [threading.Thread(target=attack, args=(f"10.30.0.{i}", until)) for i in range(1, 4)]
        for slot in slots:
            slot.start()
        for slot in slots:
            slot.join()
        time.sleep(2.0)  # the nodes catch up; a wrong eviction would have happened by now
    finally:
        nodes.stop.set()
        nodes.join()
    assert {status for status, _, _ in answered} == {408}, answered
    assert all(closed and 1.5 < waited < 3.0 for _, closed, waited in answered), answered
    assert max(nodes.latencies) < 1.0, max(nodes.latencies)
    assert evictions(volt) == 0
    assert len(volt.request("GET", "/v1/members")[1]) == 100
    assert not nodes.failures, nodes.failures[:10]


def _worker_pid(volt: VoltProcess) -> int:
    """The Granian worker process (the child of the volt-api process this test started)."""
    assert volt.proc is not None
    pid = volt.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_issue_10_a_frozen_volt_api_evicts_nobody_when_it_resumes(volt_factory) -> None:
    """volt-api itself cannot serve (its worker stopped for twice node_timeout): when it
    resumes, the evictor sees that the event loop was blocked and evicts none of the hosts
    whose heartbeats were waiting."""
    volt = volt_factory(auth__node_secret=SECRET, node_timeout=4)
    nodes = Heartbeats(volt, 20, timeout=30.0)
    nodes.join_all()
    nodes.start()
    worker = _worker_pid(volt)
    try:
        time.sleep(1.5)
        os.kill(worker, signal.SIGSTOP)
        time.sleep(9.0)
        os.kill(worker, signal.SIGCONT)
        time.sleep(3.0)
    finally:
        os.kill(worker, signal.SIGCONT)
        nodes.stop.set()
        nodes.join()
    assert evictions(volt) == 0
    assert len(volt.request("GET", "/v1/members")[1]) == 20
    assert re.search(r"could not serve for \S+ of the last", volt.log()), volt.log()[-2000:]


# -- TLS ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA)."""
    workdir = tmp_path_factory.mktemp("tls")
    cert, key = workdir / "volt.pem", workdir / "volt.key"
    subprocess.run(
        [
            *OPENSSL_REQ,
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=volt-test"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_issue_10_tls_with_the_ca_and_plain_http_refused(volt_factory, certificate) -> None:
    cert, key = certificate
    volt = volt_factory(
        auth__node_secret=SECRET, ssl__cert_file=cert, ssl__key_file=key, ca_file=cert
    )
    assert volt.url.startswith("https://")
    with Client(volt.url, token=tok(A), ca_file=str(cert), timeout=10) as client:
        peer_id, parents = client.volumes.get(VOLUME)
        assert (peer_id, parents) == (f"{A}:{VOLUME}", [])
    cli = ["--endpoint", volt.url, "--token", str(volt.token), "--os-cacert", str(cert)]
    assert shell.main([*cli, "node-list"]) == 0
    assert shell.main([*cli[:4], "node-list"]) == 1  # without the CA: refused
    link = VoltLink(volt.url, tok(B), B, ca_file=str(cert))
    assert link.join(VOLUME, timeout_s=5)[0] == f"{B}:{VOLUME}"
    assert set(link.heartbeat()) == {f"{B}:{VOLUME}"}
    # Without the CA the certificate is not trusted; plain HTTP gets no HTTP answer.
    untrusted = Client(volt.url, token=tok(A), timeout=10)
    with untrusted, pytest.raises(exc.ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.volumes.get(VOLUME)
    plain = Client(volt.url.replace("https://", "http://"), token=tok(A), timeout=10)
    with plain, pytest.raises(exc.ConnectionFailed):
        plain.volumes.get(VOLUME)
    context = ssl.create_default_context(cafile=str(cert))
    raw = socket.create_connection(("127.0.0.1", volt.port), timeout=10)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() == "TLSv1.3"
    assert volt.request("GET", "/v1/members")[0] == 200
