"""Errors of the Volt client: one class per HTTP status volt-api answers with.

volt-api error bodies look like
``{"errors": [{"status", "code", "title", "detail", "request_id"}]}``; the first error's
``code``, ``detail`` and ``request_id`` end up on the exception.
"""

from __future__ import annotations

import json
from typing import Any


class VoltClientError(Exception):
    """A request to volt-api failed.

    ``status`` is the HTTP status (None when no answer arrived), ``code`` the stable machine
    code of volt-api (e.g. ``"volt.volume.not_found"``), ``detail`` the human explanation.
    """

    def __init__(
        self,
        status: int | None,
        code: str | None,
        detail: str,
        request_id: str | None = None,
        *,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        self.method = method
        self.path = path
        super().__init__(self._message())

    def _message(self) -> str:
        head = " ".join(p for p in (self.method, self.path) if p)
        if self.status is not None:
            head = f"{head} -> {self.status}" if head else str(self.status)
        if self.code:
            head = f"{head} {self.code}" if head else self.code
        text = f"{head}: {self.detail}" if head else self.detail
        if self.request_id:
            text += f" [{self.request_id}]"
        return text


class BadRequest(VoltClientError):
    """400: a value was refused (``detail`` names the field) or the body is malformed."""


class Unauthorized(VoltClientError):
    """401: missing or wrong token."""


class NotFound(VoltClientError):
    """404: no such volume tree, peer or resource."""


class Conflict(VoltClientError):
    """409: the request conflicts with the current state."""


class ServiceUnavailable(VoltClientError):
    """503: volt-api cannot reach its store right now; retry later."""


class ConnectionFailed(VoltClientError):
    """No HTTP answer: connection refused, DNS failure, timeout."""

    def __init__(self, detail: str, *, method: str | None = None, path: str | None = None):
        super().__init__(None, None, detail, method=method, path=path)


class InvalidResponse(VoltClientError):
    """volt-api answered with a body that is not the JSON this client expects."""


BY_STATUS: dict[int, type[VoltClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    503: ServiceUnavailable,
}


def from_response(
    method: str, path: str, status: int, body: bytes, request_id: str | None = None
) -> VoltClientError:
    """The exception for an error answer (any status >= 400)."""
    code: str | None = None
    detail = ""
    try:
        parsed: Any = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    errors = parsed.get("errors") if isinstance(parsed, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        code = first.get("code") if isinstance(first.get("code"), str) else None
        detail = str(first.get("detail") or first.get("title") or "")
        request_id = first.get("request_id") or request_id
    if not detail:
        detail = body[:200].decode("utf-8", "replace").strip() or "no error detail"
    cls = BY_STATUS.get(status, VoltClientError)
    return cls(status, code, detail, request_id, method=method, path=path)
