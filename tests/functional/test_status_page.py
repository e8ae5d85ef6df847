"""Issue 13, Build 6: the live status page, rendered by a real headless Chromium.

A real volt-api (token auth) with a cluster controller over 4 stand-in nodes
(tests/functional/fakenode.py, on 127.0.0.11-14) holds a tree of 6 nodes for one image and
one finished burst of 4 VMs. The browser signs in through the page's form; the test reads
the DOM the page's script built: the node count, every parent edge and depth equal Volt's
own ``GET /v1/volumes/{id}``; a 7th node registered meanwhile appears without a reload; the
token is in no URL, cookie, web storage or log line. Without the token: 401, no data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brick.wait import wait_until
from tests.functional.browser import Browser
from tests.functional.voltproc import free_port

pytestmark = pytest.mark.functional
ROOT = Path(__file__).resolve().parents[2]
VOLUME = "volume-image1"
IQN = f"iqn.2010-10.org.openstack:{VOLUME}"
NODE_HOSTS = [f"127.0.0.{i}" for i in (11, 12, 13, 14)]
OTHER_HOSTS = ["127.0.0.15", "127.0.0.16"]  # Volt members that are no controller node


@pytest.fixture
def fake_nodes(tmp_path: Path) -> Iterator[list[dict[str, str]]]:
    procs: list[subprocess.Popen[bytes]] = []
    nodes = []
    try:
        for i, host in enumerate(NODE_HOSTS):
            port = free_port()
            log = open(tmp_path / f"fakenode{i}.log", "ab")  # noqa: SIM115 - the child's
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.functional.fakenode", str(port), "4", "4096",
                     host],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
            log.close()
            nodes.append({"id": f"node{i + 1}", "url": f"http://{host}:{port}/RPC2"})
        for i, _ in enumerate(procs):
            wait_until(
                lambda i=i: b"ready" in (tmp_path / f"fakenode{i}.log").read_bytes(),
                timeout_s=10, what=f"fake node {i} ready",
            )  # fmt: skip
        yield nodes
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def browser() -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def join(volt, host: str, *, register: bool = True) -> None:
    status, answer = volt.request("GET", f"/v1/volumes/query/{VOLUME}", {"host": host})
    assert status == 200 and answer["peer_id"] == f"{host}:{VOLUME}", answer
    if register:
        body = {"host": host, "port": "3260", "iqn": IQN, "lun": "1"}
        status, answer = volt.request("POST", f"/v1/volumes/{VOLUME}/{host}:{VOLUME}", body)
        assert status == 200, answer


EDGES_JS = """[...document.querySelectorAll('svg.tree[data-image="volume-image1"] g.node.peer')]
  .map(g => [g.dataset.peer, g.dataset.parent, Number(g.dataset.depth), g.dataset.status])
  .sort()"""
LINES_JS = """[...document.querySelectorAll('svg.tree[data-image="volume-image1"] line.tree-edge')]
  .map(l => [l.dataset.child, l.dataset.parent]).sort()"""
PEERS_JS = "document.querySelectorAll('svg.tree g.node.peer').length"


LABELS_JS = """[...document.querySelectorAll(
  'svg.tree[data-image="volume-image1"] text.edge-bytes')]
  .map(t => [t.dataset.child, t.dataset.source, Number(t.dataset.bytes)]).sort()"""
TOTALS_JS = """(p => [p.dataset.imageServer, p.dataset.peers, p.dataset.reporting].map(Number))(
  document.querySelector('div.image[data-image="volume-image1"] p.bytes'))"""
SERVED_JS = """Object.fromEntries([...document.querySelectorAll(
  'svg.tree[data-image="volume-image1"] g.node.peer')]
  .map(g => [g.dataset.peer, g.querySelector('title').textContent]))"""
READ_EACH = 8 << 20  # what every node says it read, over its sources


def human(n: int) -> str:
    """The page's way to write a byte count (status.js ``human``) for whole MiB and 0."""
    return f"{n / (1 << 20):.1f} MiB" if n else "0 B"


def report_reads(volt, tree: list[list[object]]) -> list[tuple[str, str, int]]:
    """Each node's heartbeat says it read READ_EACH: 3/4 from its tree parent, the rest from
    the image server (all of it when the image server is its parent). Returns
    (child, source or "", bytes) as the page should draw them."""
    drawn = []
    for peer, parent, _, _ in tree:
        assert isinstance(peer, str) and isinstance(parent, str)
        reads = {parent: READ_EACH * 3 // 4}
        reads[""] = reads.get("", 0) + READ_EACH // 4
        counters = [
            {"peer_id": peer, "source": src or None, "bytes": n} for src, n in reads.items()
        ]
        body = {"host": peer.split(":")[0], "bytes_read": counters}
        status, answer = volt.request("PUT", "/v1/members/heartbeat", body)
        assert status == 200, answer
        drawn += [(peer, src, n) for src, n in reads.items()]
    return drawn


def volts_tree(volt) -> list[list[object]]:
    status, nodes = volt.request("GET", f"/v1/volumes/{VOLUME}")
    assert status == 200
    return sorted([n["peer_id"], n["parent"] or "", n["depth"], n["status"]] for n in nodes)


def test_status_page_renders_the_tree_live_behind_the_token(
    volt_factory, fake_nodes, browser: Browser, tmp_path: Path
) -> None:
    nodes_file = tmp_path / "nodes.json"
    nodes_file.write_text(json.dumps(fake_nodes))
    volt = volt_factory(cluster__nodes_file=nodes_file)
    for host in NODE_HOSTS + OTHER_HOSTS[:1]:
        join(volt, host)
    join(volt, OTHER_HOSTS[1], register=False)  # one PENDING node
    status, task = volt.request(
        "POST", "/v1/clusters",
        {"image": "image1", "count": 4, "flavor": {"vcpus": 1, "memory_mb": 128}},
    )  # fmt: skip
    assert status == 202, task
    wait_until(
        lambda: volt.request("GET", task["href"])[1]["status"] == "DONE",
        timeout_s=20, what="the burst DONE",
    )  # fmt: skip
    expected = volts_tree(volt)
    assert len(expected) == 6 and max(depth for _, _, depth, _ in expected) >= 2
    reported = report_reads(volt, expected)

    # Without the token: 401 and no data; the page's own files hold none either.
    status, body = volt.request("GET", "/v1/status", token="")
    assert status == 401 and set(body) == {"errors"}
    assert body["errors"][0]["code"] == "volt.unauthenticated"
    assert volt.request("GET", "/v1/status", token="wrong")[0] == 401
    for path in ("/status", "/status/status.js", "/status/status.css"):
        with open_url(volt.url + path) as answer:
            text = answer.read().decode()
            assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
        assert not any(h in text for h in NODE_HOSTS + OTHER_HOSTS), path

    browser.open(volt.url + "/status")
    browser.wait_for(
        "document.getElementById('login') !== null && document.readyState === 'complete'"
    )
    # A wrong token: signed out again, nothing drawn.
    sign_in(browser, "not-the-token")
    assert browser.wait_for("document.getElementById('login-error').textContent") == "wrong token"
    assert browser.evaluate(PEERS_JS) == 0

    sign_in(browser, volt.token)
    browser.wait_for(f"{PEERS_JS} === 6")
    assert browser.evaluate(EDGES_JS) == expected
    assert browser.evaluate(LINES_JS) == sorted([p, parent] for p, parent, _, _ in expected)
    # Bytes per source: on each edge what the child read from that source, and per image
    # the totals; every node's sources add up to what it read (READ_EACH).
    labels = sorted(browser.evaluate(LABELS_JS))
    assert labels == sorted([c, src, n] for c, src, n in reported)
    for peer, *_ in expected:
        assert sum(n for c, _, n in labels if c == peer) == READ_EACH
    assert browser.evaluate(TOTALS_JS) == [
        sum(n for _, src, n in reported if src == ""),
        sum(n for _, src, n in reported if src != ""),
        6,
    ]
    assert all(n > 0 for _, src, n in reported if src == "")
    served = browser.evaluate(SERVED_JS)  # each node's tooltip: what the others read from it
    for peer, *_ in expected:
        mine = sum(n for _, src, n in reported if src == peer)
        assert served[peer].endswith(f"served to other nodes: {human(mine)})"), served[peer]
    rows = browser.evaluate(
        "[...document.querySelectorAll('#nodes tbody tr')].map(r => "
        "[...r.cells].map(c => c.textContent))"
    )
    assert [r[0] for r in rows] == ["node1", "node2", "node3", "node4", *OTHER_HOSTS]
    assert all(r[6] == VOLUME for r in rows)  # every node holds the image in its cache
    assert sorted(r[5].count("RUNNING") for r in rows[:4]) == [1, 1, 1, 1]
    assert browser.wait_for(
        "[...document.querySelectorAll('#tasks tbody tr')].map(r => r.dataset.status + ' ' + "
        "r.cells[3].textContent).join(';')"
    ) == "DONE RUNNING 4"  # fmt: skip
    browser.wait_for("document.querySelector('#nodes tbody tr').cells[3].textContent === '1 / 4'")

    # A migration shows in its table: from, to, and the bytes the source said it moved.
    vm = next(v for v in volt.request("GET", task["href"])[1]["vms"] if v["node"] == "node1")
    status, _ = volt.request("POST", f"/v1/vms/{vm['userid']}/migrate", {"destination": "node2"})
    assert status == 202
    row = browser.wait_for(
        f"(r => r && r.dataset.state === 'done' && [...r.cells].map(c => c.textContent))"
        f"(document.querySelector('#migrations tbody tr[data-vm=\"{vm['userid']}\"]'))"
    )
    assert row[1:5] == ["node1", "node2", "done", "16.0 MiB"], row

    # It updates by itself: a node that joins now is drawn at the next poll.
    polls = browser.evaluate("Number(document.body.dataset.polls)")
    join(volt, "127.0.0.17")
    browser.wait_for(f"{PEERS_JS} === 7", timeout=10)
    assert browser.evaluate("Number(document.body.dataset.polls)") > polls
    assert browser.evaluate(EDGES_JS) == volts_tree(volt)

    shot = tmp_path / "status-page.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VMT_STATUS_SCREENSHOT"):  # how docs/_static/status-page.png is made
        shutil.copy(shot, os.environ["VMT_STATUS_SCREENSHOT"])

    # The token went only into headers: no URL, cookie, storage or log line holds it.
    urls = browser.request_urls()
    assert any(u.endswith("/v1/status") for u in urls)
    assert not any(volt.token in u for u in urls)
    assert browser.evaluate(
        "document.cookie + localStorage.length + sessionStorage.length + location.href"
    ) == f"00{volt.url}/status"  # fmt: skip
    assert volt.token not in volt.log()


def sign_in(browser: Browser, token: str) -> None:
    browser.evaluate(
        f"document.getElementById('token').value = {json.dumps(token)};"
        "document.getElementById('login').requestSubmit(); true"
    )


def open_url(url: str) -> Any:
    return urllib.request.urlopen(url, timeout=10)
