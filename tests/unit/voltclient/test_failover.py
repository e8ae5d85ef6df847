"""The client's endpoint list: validation, order, failover on connection errors and 5xx only."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import requests

from voltclient import Client, exceptions
from voltclient.client import HTTPClient, parse_endpoints


class FakeResponse:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code = status
        self.content = body
        self.headers: dict[str, str] = {}


class FakeSession:
    """Answers per endpoint: a status and body, or an exception to raise."""

    def __init__(self, answers: dict[str, tuple[int, bytes] | Exception]) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.timeouts: list[Any] = []
        self.headers: dict[str, str] = {}

    def request(self, method: str, url: str, **kwargs: Any) -> FakeResponse:
        endpoint = url.split("/v1")[0]
        self.calls.append(endpoint)
        self.timeouts.append(kwargs["timeout"])
        answer = self.answers[endpoint]
        if isinstance(answer, Exception):
            raise answer
        return FakeResponse(*answer)

    def close(self) -> None:
        pass


def client(endpoints: str, answers: dict[str, tuple[int, bytes] | Exception]) -> HTTPClient:
    http = HTTPClient(endpoints, token="t", timeout=7.0)
    http.session = FakeSession(answers)  # type: ignore[assignment]
    return http


A, B, C = "http://10.0.0.1:7447", "http://10.0.0.2:7447", "https://[fd00::3]:7447"
REFUSED = requests.ConnectionError("refused")
ERROR_503 = (503, b'{"errors": [{"code": "volt.store.unavailable", "detail": "down"}]}')
ERROR_404 = (404, b'{"errors": [{"code": "volt.volume.not_found", "detail": "no"}]}')


def test_parse_endpoints_validates_each() -> None:
    assert parse_endpoints(f"{A}, {B}/ ,{C}") == [A, B, C]
    assert parse_endpoints("10.0.0.1:7447") == [A]
    assert parse_endpoints(f"{A},{A}") == [A]
    for bad in (
        f"{A},",
        "ftp://x:1",
        "http://:7447",
        "http://x:99999",
        "http://x/?a=1",
        "http://u:p@x:1",
        f"{A},http://x:port",
    ):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_one_endpoint_keeps_its_timeout() -> None:
    http = client(A, {A: (200, b"[]")})
    assert http.request("GET", "/v1/volumes") == []
    assert http.session.timeouts == [7.0]  # type: ignore[attr-defined]


def test_fails_over_on_connection_error_and_remembers(caplog: pytest.LogCaptureFixture) -> None:
    http = client(f"{A},{B},{C}", {A: REFUSED, B: (200, b"[1]"), C: (200, b"[2]")})
    with caplog.at_level(logging.WARNING, "voltclient.client"):
        assert http.request("GET", "/v1/volumes") == [1]
    assert http.endpoint == B
    assert "failing over to http://10.0.0.2:7447" in caplog.text
    assert "http://10.0.0.2:7447 answered" in caplog.text
    assert http.request("GET", "/v1/volumes") == [1]
    assert http.session.calls == [A, B, B]  # type: ignore[attr-defined]
    # several endpoints: a short connect timeout, the full read timeout
    assert http.session.timeouts[0] == (3.0, 7.0)  # type: ignore[attr-defined]


def test_fails_over_on_5xx_and_timeouts_and_wraps_around() -> None:
    http = client(f"{A},{B},{C}", {A: (200, b"[0]"), B: ERROR_503, C: requests.Timeout()})
    http._current = 1
    assert http.request("GET", "/v1/volumes") == [0]
    assert http.session.calls == [B, C, A]  # type: ignore[attr-defined]
    assert http.endpoint == A


def test_4xx_is_final() -> None:
    http = client(f"{A},{B}", {A: ERROR_404, B: (200, b"[]")})
    with pytest.raises(exceptions.NotFound):
        http.request("GET", "/v1/volumes/x")
    assert http.session.calls == [A]  # type: ignore[attr-defined]
    assert http.endpoint == A


def test_all_down_raises_the_last_error(caplog: pytest.LogCaptureFixture) -> None:
    http = client(f"{A},{B}", {A: REFUSED, B: ERROR_503})
    with (
        caplog.at_level(logging.ERROR, "voltclient.client"),
        pytest.raises(exceptions.VoltClientError) as err,
    ):
        http.request("GET", "/v1/volumes")
    assert err.value.status == 503
    assert "no volt-api of" in caplog.text
    assert http.endpoint == A  # nothing answered: the order stays


def test_client_accepts_a_list() -> None:
    with Client(f"{A},{B}", token="t") as c:
        assert c.http_client.endpoints == [A, B]
    with pytest.raises(ValueError):
        Client("http://a:1,gopher://b:2")
