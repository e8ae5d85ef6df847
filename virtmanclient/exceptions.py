"""Errors of the Virtman client.

Two families:

* a call reached virtman and it answered with a non-zero result code (only raised when the
  caller asks for ``checked=True``): :class:`AlreadyExists` / :class:`DoesNotExist` for the
  warnings (code 1) of create and destroy, :class:`Failed` for failures (code 2);
* the call did not produce a result: :class:`ConnectionFailed` (no answer at all),
  :class:`Unauthorized` / :class:`RequestFailed` (HTTP error status), :class:`RemoteFault`
  (the server raised instead of answering a result string), :class:`InvalidResponse`.
"""

from __future__ import annotations


class VirtmanError(Exception):
    """Base class of every error of the Virtman client."""


# -- result codes (checked=True) ----------------------------------------------------------
class ResultError(VirtmanError):
    """Virtman answered ``"<code>:<info>"`` with a non-zero code."""

    def __init__(self, method: str, code: int, info: str) -> None:
        self.method = method
        self.code = code
        self.info = info
        super().__init__(f"{method}: {info}" if info else f"{method}: result code {code}")


class AlreadyExists(ResultError):
    """Code 1 of ``create`` / ``create_image_target``: the instance or image target exists."""


class DoesNotExist(ResultError):
    """Code 1 of ``destroy`` / ``destroy_image_target``: no such instance or image target."""


class Failed(ResultError):
    """Code 2 (or any unknown non-zero code): the operation failed."""


# -- no result ----------------------------------------------------------------------------
class ConnectionFailed(VirtmanError):
    """No answer: connection refused, unreachable, reset, or no answer within the timeout."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach virtman at {url}: {reason}")


class RequestFailed(VirtmanError):
    """The server answered with an HTTP error status (wrong path, server error …)."""

    def __init__(self, url: str, status: int, reason: str, message: str | None = None) -> None:
        self.url = url
        self.status = status
        self.reason = reason
        super().__init__(message or f"{url} answered HTTP {status} {reason}".rstrip())


class Unauthorized(RequestFailed):
    """HTTP 401: the server wants an X-Auth-Token and the one sent (if any) is wrong."""

    def __init__(self, url: str, status: int = 401, reason: str = "Unauthorized") -> None:
        message = f"{url} refused the call: missing or wrong X-Auth-Token (HTTP {status})"
        super().__init__(url, status, reason, message)


# XML-RPC fault codes of virtmanserver: 1 for any error, these for the ones a caller acts on.
FAULT_GUEST_NOT_FOUND = 404  # no guest of that userid on the node


class RemoteFault(VirtmanError):
    """The server raised an exception (XML-RPC fault) instead of answering a result."""

    def __init__(self, method: str, fault_code: int, fault_string: str) -> None:
        self.method = method
        self.fault_code = fault_code
        self.fault_string = fault_string
        super().__init__(f"{method}: server fault {fault_code}: {fault_string}")


class InvalidResponse(VirtmanError, ValueError):
    """An answer that is not what the contract promises (not ``"<code>:<info>"`` …)."""


def guest_not_found(exc: BaseException) -> bool:
    """True when ``exc`` is virtmanserver's answer that the guest does not exist."""
    return isinstance(exc, RemoteFault) and exc.fault_code == FAULT_GUEST_NOT_FOUND
