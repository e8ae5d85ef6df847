"""Issue 10, bad-input suite (XML-RPC half): Hypothesis-generated calls to a real virtmanserver.

One virtmanserver (qemu driver, a real volt-api) on 127.0.0.0/8 holds an image target and a
VM instance built on it. Then >= 5,000 generated calls go to every method (the original's
six, ``system.*`` introspection, unknown and private names), with and without the token:
wrong types, wrong arity, huge strings, unicode, NUL bytes, paths, traversal, shell
metacharacters, nested structs. Batches of calls run concurrently.

Every answer must be well formed: HTTP 200 with an XML-RPC response (a result of the method's
shape: ``"1:..."``/``"2:..."`` strings for the four mutating methods, never ``"0:..."``, or
a Fault), or 401 without the token, or 413 for a body over ``max_request_bytes``; never a 5xx
and never a traceback. The daemon stays up, and its state is the same before and after:
``list()``, ``list_image_target()``, tgtd's targets, and the files of its state, cache,
instances and run directories.

Seeded (``VMT_FUZZ_SEED``); ``VMT_FUZZ_BATCHES`` batches of ``CALLS_PER_BATCH`` calls.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import string
import xmlrpc.client
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.functional.virtmanproc import VirtmanProcess
from tests.functional.voltproc import VoltProcess

pytestmark = pytest.mark.functional

SEED = int(os.environ.get("VMT_FUZZ_SEED", "20261205"))
BATCHES = int(os.environ.get("VMT_FUZZ_BATCHES", "520"))
CALLS_PER_BATCH = 10
MIN_CALLS = 5000
HOST = "127.0.0.41"
TOKEN = "fuzz-api-token"
# Names the generators cannot hit by chance: the state every call must leave alone.
KEEP_IMAGE, KEEP_VM = "keep-Zq8w3-img", "keep-Zq8w3-vm"
KINDS = ("401", "413", "fault", "ok", "result 1", "result 2")  # what call() returns
MUTATING = {"create", "destroy", "create_image_target", "destroy_image_target"}
METHODS = [
    "create",
    "destroy",
    "list",
    "create_image_target",
    "destroy_image_target",
    "list_image_target",
    "system.listMethods",
    "system.methodHelp",
    "system.methodSignature",
]
ODD_NAMES = [
    "system.multicall",
    "_dispatch",
    "__init__",
    "_virtman",
    "_images",
    "virtman",
    "images",
    "create.__globals__",
    "list.__self__",
    "__class__",
    "system",
    "",
    "CREATE",
    "create ",
]
NASTY = [
    "",
    "\x00",
    "a\x00b",
    "..",
    ".",
    "/",
    "../../etc/shadow",
    "/etc/shadow",
    "/root/.ssh/id_rsa",
    "/tmp/x/../../root/secret.img",
    "/proc/self/environ",
    "/dev/sda",
    "/dev/loop0",
    "/dev/zero",
    "$(reboot)",
    "`id`",
    "; rm -rf /",
    "| cat /etc/passwd",
    "&& true",
    "a'b\"c",
    "%s%n%x",
    "{0}",
    "${HOME}",
    "\u202e\u0000\ufeff",
    "\u210c\U0001d522\U0001d529\u00e9\u4e2d\U0001f600",  # letters beyond ASCII
    "volume-",
    "volume-" + "a" * 60,
    "a" * 65,
    "-rf",
    "iqn.2010-10.org.openstack:",
    "iqn.2010-10.org.openstack:volume-x;id",
    "127.0.0.1:3260",
    "[::1]:3260",
    "127.0.0.1:0",
    "127.0.0.1:99999",
    "<script>",
    "]]>",
    "&amp;",
    KEEP_IMAGE + "x",
    KEEP_VM + " ",
]


def xml_text(max_size: int, controls: bool = False) -> st.SearchStrategy[str]:
    """Text the client can encode (no lone surrogates); with ``controls``, also characters
    XML cannot carry (the server's parser must refuse them)."""
    excluded = ["Cs"] if controls else ["Cs", "Cc"]
    return st.text(st.characters(exclude_categories=excluded), max_size=max_size)


def rarely(rare: st.SearchStrategy[Any], common: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``rare`` for about one draw in 20."""
    # Not 0 or 19: Hypothesis favours the bounds of a range.
    return st.integers(0, 19).flatmap(lambda i: rare if i == 7 else common)


def paths(image_dir: Path) -> st.SearchStrategy[str]:
    """Paths around the allowed directory: escapes, links, missing files, the directory."""
    escapes = [
        f"{image_dir}/../../../etc/passwd",
        f"{image_dir}/link-out",
        f"{image_dir}/missing.raw",
        f"{image_dir}/",
        str(image_dir),
        f"{image_dir}/sub/../../state",
        f"{image_dir}/odd.raw",  # not a multiple of 512 bytes
    ]
    parts = st.sampled_from(["..", ".", "etc", "root", "dev", "x", "", image_dir.name])
    built = st.lists(parts, max_size=8).map(lambda p: "/" + "/".join(p))
    return st.one_of(st.sampled_from(escapes + NASTY), built, xml_text(300).map(lambda t: "/" + t))


def scalars(image_dir: Path) -> st.SearchStrategy[Any]:
    common = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(NASTY),
        xml_text(64),
        st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=70),
        paths(image_dir),
        st.binary(max_size=64).map(xmlrpc.client.Binary),
    )
    rare = st.one_of(
        xml_text(64, controls=True),
        st.integers(min_value=1, max_value=300_000).map(lambda n: "A" * n),  # huge strings
        st.just("\u00e9" * 600_000),  # over max_request_bytes once encoded: 413
    )
    return rarely(rare, common)


def values(image_dir: Path) -> st.SearchStrategy[Any]:
    """Scalars, lists and structs of them, nested."""
    return st.recursive(
        scalars(image_dir),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.one_of(xml_text(12), st.sampled_from(KEYS)), inner, max_size=4),
        ),
        max_leaves=12,
    )


KEYS = ["target_portal", "target_iqn", "target_lun", "x", ""]


def connections(image_dir: Path) -> st.SearchStrategy[Any]:
    """Connection dicts that look right with at least one field wrong (a valid one would make
    the node build a stack: a side effect this suite must not cause)."""
    portal = st.sampled_from(["127.0.0.1:3260", "127.0.0.1:0", "x y:1", "", "[::1]", "1.2.3.4"])
    iqn = st.sampled_from(["iqn.2010-10.org.openstack:volume-x", "iqn.bad", "", "iqn.2010-10.X"])
    lun = st.one_of(st.sampled_from([1, "1", -1, 256, "01x", True, None]), values(image_dir))
    wrong = st.fixed_dictionaries(
        {"target_portal": portal, "target_iqn": iqn, "target_lun": lun},
        optional={"extra": values(image_dir)},
    ).filter(lambda d: not _valid_connection(d))
    return st.one_of(wrong, st.lists(wrong, max_size=3), values(image_dir))


def _valid_connection(conn: dict[str, Any]) -> bool:
    return (
        conn["target_portal"] == "127.0.0.1:3260"
        and conn["target_iqn"] == "iqn.2010-10.org.openstack:volume-x"
        and conn["target_lun"] in (1, "1")
        and "extra" not in conn
    )


def calls(image_dir: Path) -> st.SearchStrategy[tuple[str, tuple[Any, ...], str | None]]:
    """(method, arguments, token) of one call."""
    anything = values(image_dir)
    arity = st.lists(anything, max_size=6).map(tuple)
    # Valid names half of the time, so that calls get past the first check.
    name = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), anything)
    shaped = {
        "create": st.tuples(name, name, connections(image_dir), anything),
        "create_image_target": st.tuples(name, paths(image_dir), anything, anything),
        "destroy": st.tuples(name),
        "destroy_image_target": st.tuples(name),
    }
    method = rarely(
        st.one_of(
            st.sampled_from(ODD_NAMES),
            xml_text(40),
            st.sampled_from(METHODS).map(lambda m: "system." + m),
        ),
        st.sampled_from(METHODS),
    )
    token = rarely(st.sampled_from([None, "wrong", TOKEN + "\u00e9", ""]), st.just(TOKEN))

    @st.composite
    def one(draw: st.DrawFn) -> tuple[str, tuple[Any, ...], str | None]:
        called = draw(method)
        shape = called in shaped and draw(st.integers(0, 3)) > 0
        args = draw(shaped[called]) if shape else draw(arity)
        return called, args, draw(token)

    return one()


def call(node: VirtmanProcess, name: str, args: tuple[Any, ...], token: str | None) -> str:
    """Send one call; check the answer's form; return a short label of its kind."""
    body = xmlrpc.client.dumps(args, methodname=name, allow_none=True).encode("utf-8")
    headers = {"Content-Type": "text/xml"}
    if token is not None:
        headers["X-Auth-Token"] = token
    conn = http.client.HTTPConnection(node.host_ip, node.port, timeout=60)
    try:
        # A refused large body may break the pipe: the answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request("POST", "/RPC2", body, headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    assert b"Traceback" not in data, (name, data[:2000])
    if response.status == 401:
        assert token != TOKEN, (name, data)
        return "401"
    if response.status == 413:
        assert len(body) > 1 << 20, (name, len(body))
        return "413"
    assert response.status == 200, (name, response.status, data[:2000])
    assert response.getheader("Content-Type") == "text/xml"
    assert token == TOKEN
    try:
        (result,), _ = xmlrpc.client.loads(data, use_builtin_types=True)
    except xmlrpc.client.Fault as fault:
        assert isinstance(fault.faultCode, int) and isinstance(fault.faultString, str)
        return "fault"
    if name in MUTATING:
        assert isinstance(result, str) and re.match(r"[12]:", result), (name, args, result)
        return "result " + result[0]
    return "ok"


@pytest.fixture
def node(tmp_path: Path, volt: VoltProcess) -> Any:
    proc = VirtmanProcess(
        tmp_path / "node",
        host_ip=HOST,
        token=TOKEN,
        master_port=volt.port,
        master_token=volt.token,
        heartbeat_interval=1,
        rpc_workers=4,
    ).start()
    yield proc
    proc.stop()


def test_issue_10_virtman_bad_input_suite(node: VirtmanProcess, tmp_path: Path) -> None:
    images = node.image_dir
    keep = images / "keep.raw"
    keep.write_bytes(os.urandom(4 << 20))
    (images / "odd.raw").write_bytes(b"x" * 1000)
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"\0" * 4096)
    (images / "link-out").symlink_to(outside)
    client = node.client()
    assert client.create_image_target(KEEP_IMAGE, str(keep)).startswith("0:")
    iscsi_port = node.config_path.read_text().split("iscsi_port = ")[1].split()[0]
    conn = {
        "target_portal": f"{HOST}:{iscsi_port}",
        "target_iqn": f"iqn.2010-10.org.openstack:volume-{KEEP_IMAGE}",
        "target_lun": 1,
    }
    assert client.create(KEEP_VM, KEEP_IMAGE, conn).startswith("0:")
    before = node.state()
    assert before["list"] == [f"{KEEP_VM}:volume-{KEEP_IMAGE}"]
    seen: Counter[str] = Counter()
    pool = ThreadPoolExecutor(max_workers=4)

    @seed(SEED)
    @settings(
        max_examples=BATCHES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(calls(images), min_size=CALLS_PER_BATCH, max_size=CALLS_PER_BATCH))
    def batch(items: list[tuple[str, tuple[Any, ...], str | None]]) -> None:
        kinds = list(pool.map(lambda c: call(node, *c), items))
        seen.update(kinds)
        if os.environ.get("VMT_FUZZ_DEBUG"):
            seen.update(f"{n}:{k}" for (n, _, _), k in zip(items, kinds, strict=True))
        seen.update(["methods:" + name for name, _, _ in items if name in METHODS])

    try:
        batch()
        # The owned state by its own names: exists (1:), and a link out is still refused (2:).
        assert call(node, "create", (KEEP_VM, KEEP_IMAGE, conn), TOKEN) == "result 1"
        assert call(node, "create_image_target", (KEEP_IMAGE, str(keep)), TOKEN) == "result 1"
        link = str(images / "link-out")
        assert call(node, "create_image_target", ("other", link), TOKEN) == "result 2"
    finally:
        pool.shutdown()
    total = sum(seen[kind] for kind in KINDS)
    print(f"bad-input suite: {total} calls, {dict(sorted(seen.items()))}")
    assert node.proc is not None and node.proc.poll() is None, node.logs()[-3000:]
    assert node.state() == before
    assert keep.read_bytes() and outside.read_bytes() == b"\0" * 4096
    if BATCHES * CALLS_PER_BATCH >= MIN_CALLS:
        assert total >= MIN_CALLS
        for kind in KINDS:
            assert seen[kind] > 0, seen
        for name in METHODS:
            assert seen["methods:" + name] > 0, seen
