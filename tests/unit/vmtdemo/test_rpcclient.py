"""vmt-demo/rpcclient.py against a real XML-RPC server on 127.0.0.1: the answer, the token
header, the timeout, and the script form LocalCluster.rpc runs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

import pytest

VMT_DEMO = Path(__file__).resolve().parents[3] / "vmt-demo"
if str(VMT_DEMO) not in sys.path:
    sys.path.insert(0, str(VMT_DEMO))

import rpcclient  # noqa: E402

TOKENS: list[str | None] = []
RELEASE = threading.Event()  # the "hang" method answers once this is set


class Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/RPC2",)

    def decode_request_content(self, data: bytes) -> bytes | None:
        TOKENS.append(self.headers.get("X-Auth-Token"))
        return super().decode_request_content(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = SimpleXMLRPCServer(("127.0.0.1", 0), Handler, allow_none=True, logRequests=False)
    server.register_function(lambda *args: list(args), "echo")
    server.register_function(lambda: RELEASE.wait(30), "hang")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    TOKENS.clear()
    RELEASE.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/RPC2"
    RELEASE.set()
    server.shutdown()
    server.server_close()


def test_call_answers_and_sends_the_token(url: str) -> None:
    assert rpcclient.call(url, "s3cret", "echo", (1, "a", None)) == [1, "a", None]
    assert TOKENS == ["s3cret"]


def test_no_token_no_header(url: str) -> None:
    assert rpcclient.call(url, "", "echo", []) == []
    assert TOKENS == [None]


def test_timeout_raises(url: str) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        rpcclient.call(url, "t", "hang", [], timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_script_prints_the_answer_as_json(url: str) -> None:
    out = subprocess.run(
        [sys.executable, str(VMT_DEMO / "rpcclient.py"), url, "t", "echo", json.dumps([[1, 2]])],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == [[1, 2]]
    assert TOKENS == ["t"]
