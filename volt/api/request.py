"""The request object handlers receive, and the response they return."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from volt.errors import BodyTooLarge, MalformedBody

MAX_BODY_BYTES = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    remote_addr: str
    headers: dict[str, str]
    body: Any = None  # parsed JSON, or None when there was no body
    request_id: str = ""


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-serialisable; None = empty body
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes | None = None  # pre-encoded body (metrics, documents)
    content_type: str = "application/json"


def read_json_body(environ: dict[str, Any]) -> Any:
    """The JSON body (on any method, as the original did), or None if there is none."""
    length_header = environ.get("CONTENT_LENGTH") or ""
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not length_header and not chunked:
        return None
    try:
        length = int(length_header) if length_header else -1
    except ValueError:
        raise MalformedBody("Content-Length is not a number") from None
    if length == 0:
        return None
    if length > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    stream = environ["wsgi.input"]
    raw = stream.read(length) if length > 0 else stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip(b" \t\r\n"):  # only JSON whitespace: the same as no body
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 30000 nested arrays: fits in the size limit, not the stack
        raise MalformedBody("request body is nested too deeply") from None
