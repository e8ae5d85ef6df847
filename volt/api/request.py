"""The request object handlers receive, and the response they return."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from volt.auth import ADMIN, Credential
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
    credential: Credential = ADMIN
    query: str = ""  # the raw query string


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-serialisable; None = empty body
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes | None = None  # pre-encoded body (metrics, documents)
    content_type: str = "application/json"


def parse_json(raw: bytes) -> Any:
    """Parse a body already read; only JSON whitespace is the same as no body."""
    if len(raw) > MAX_BODY_BYTES:
        raise BodyTooLarge(f"request body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip(b" \t\r\n"):
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedBody(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 30000 nested arrays: fits in the size limit, not the stack
        raise MalformedBody("request body is nested too deeply") from None
