"""The z/VM Cloud Connector's reply envelope ``{"overallRC", "rc", "rs", "modID", "output",
"errmsg"}`` (docs/zvm-api.rst): its module ids, the error it carries and the answer to each
of our errors, so every handler and the WSGI layer speak the same codes."""

from __future__ import annotations

from typing import Any

from virtman.capture import CaptureExists, CaptureFailed
from virtman.errors import (
    GuestExists,
    GuestNotFound,
    GuestStateError,
    HypervisorError,
    HypervisorUnreachable,
    InvalidInput,
    VirtmanError,
)
from virtman.zvm.images import ImageExists, ImageFailed, ImageInUse, ImageNotFound

# Module ids of the connector's envelope (zvmsdk/returncode.py ModRCs).
MOD_GUEST, MOD_NETWORK, MOD_VOLUME, MOD_IMAGE, MOD_FILE, MOD_WSGI = 10, 20, 30, 40, 60, 120


class ApiError(Exception):
    """An answer other than success: HTTP status and the connector's codes."""

    def __init__(
        self, status: int, overall: int, rc: int, rs: int, mod: int | None, errmsg: str
    ) -> None:
        super().__init__(errmsg)
        self.status, self.overall, self.rc, self.rs, self.mod = status, overall, rc, rs, mod
        self.errmsg = errmsg
        self.headers: list[tuple[str, str]] = []


def request_error(status: int, errmsg: str) -> ApiError:
    """The connector's REST-layer error: HTTP ``status``, overallRC/rc 400, rs = status."""
    return ApiError(status, 400, 400, status, MOD_WSGI, errmsg)


def not_supported(what: str, mod: int) -> ApiError:
    return ApiError(
        501,
        501,
        501,
        1,
        mod,
        f"The requested function: {what} has not been implemented in current release "
        "(no z/VM here: a Linux/KVM node of VMThunder)",
    )


# The connector's answer to each of our errors, the first match winning (subclasses first):
# (error, HTTP status, overallRC, rc, rs, module, errmsg with the error as ``exc``).
_ERRORS: tuple[tuple[type[Exception], int, int, int, int, int, str], ...] = (
    (GuestNotFound, 404, 404, 404, 1, MOD_GUEST, "Guest '{exc.name}' does not exist."),
    (GuestExists, 409, 409, 409, 1, MOD_GUEST, "Guest '{exc.name}' already exists."),
    (GuestStateError, 409, 409, 409, 1, MOD_GUEST, "{exc}"),
    (ImageNotFound, 404, 404, 404, 1, MOD_IMAGE, "{exc}"),
    (ImageExists, 409, 300, 300, 13, MOD_IMAGE, "{exc}"),
    (ImageInUse, 409, 409, 409, 1, MOD_IMAGE, "{exc}"),
    (CaptureExists, 409, 300, 300, 13, MOD_IMAGE, "{exc}"),
    (CaptureFailed, 500, 300, 300, 22, MOD_IMAGE, "{exc}"),
    (ImageFailed, 500, 300, 300, 22, MOD_IMAGE, "{exc}"),
    # the connector's "service unavailable"
    (HypervisorUnreachable, 503, 503, 503, 2, MOD_GUEST, "Guest manager unavailable: {exc}"),
    (HypervisorError, 500, 500, 500, 2, MOD_GUEST, "libvirt failed: {exc}"),
    (VirtmanError, 500, 500, 500, 3, MOD_GUEST, "Guest manager failed: {exc}"),
)


def error_of(exc: Exception) -> ApiError | None:
    """The envelope of one of our errors; None for an error that is a bug of ours."""
    if isinstance(exc, InvalidInput):
        return request_error(400, f"Validation error: {exc}")
    for kind, status, overall, rc, rs, mod, errmsg in _ERRORS:
        if isinstance(exc, kind):
            return ApiError(status, overall, rc, rs, mod, errmsg.format(exc=exc))
    return None


def envelope(output: Any) -> dict[str, Any]:
    return {"overallRC": 0, "rc": 0, "rs": 0, "modID": None, "output": output, "errmsg": ""}


def failure(err: ApiError) -> dict[str, Any]:
    return {
        "overallRC": err.overall,
        "rc": err.rc,
        "rs": err.rs,
        "modID": err.mod,
        "output": "",
        "errmsg": err.errmsg,
    }
