"""The connector's envelope for each of our errors (virtman.zvm.envelope.error_of): the first
match wins, so a subclass keeps its own answer."""

from __future__ import annotations

import pytest

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
from virtman.zvm.envelope import MOD_GUEST, MOD_IMAGE, error_of
from virtman.zvm.images import ImageExists, ImageFailed, ImageInUse, ImageNotFound

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("exc", "codes", "errmsg"),
    [
        (GuestNotFound("g1"), (404, 404, 404, 1, MOD_GUEST), "Guest 'g1' does not exist."),
        (GuestExists("g1"), (409, 409, 409, 1, MOD_GUEST), "Guest 'g1' already exists."),
        (GuestStateError("g1", "not running"), (409, 409, 409, 1, MOD_GUEST), None),
        (ImageNotFound("i1"), (404, 404, 404, 1, MOD_IMAGE), None),
        (ImageExists("i1"), (409, 300, 300, 13, MOD_IMAGE), None),
        (ImageInUse("i1", ["g1"]), (409, 409, 409, 1, MOD_IMAGE), None),
        (CaptureExists("i1", "taken"), (409, 300, 300, 13, MOD_IMAGE), None),
        (CaptureFailed("i1", "disk gone"), (500, 300, 300, 22, MOD_IMAGE), None),
        (ImageFailed("no tgtd"), (500, 300, 300, 22, MOD_IMAGE), None),
        (
            HypervisorUnreachable("down"),
            (503, 503, 503, 2, MOD_GUEST),
            "Guest manager unavailable: down",
        ),
        (HypervisorError("refused"), (500, 500, 500, 2, MOD_GUEST), "libvirt failed: refused"),
        (VirtmanError("odd"), (500, 500, 500, 3, MOD_GUEST), "Guest manager failed: odd"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_each_error_has_its_answer(
    exc: Exception, codes: tuple[int, ...], errmsg: str | None
) -> None:
    answer = error_of(exc)
    assert answer is not None
    assert (answer.status, answer.overall, answer.rc, answer.rs, answer.mod) == codes
    assert answer.errmsg == (str(exc) if errmsg is None else errmsg)


def test_invalid_input_is_a_validation_error_and_others_are_not_ours() -> None:
    answer = error_of(InvalidInput("userid", "x y", "must be a name"))
    assert answer is not None and answer.status == 400
    assert answer.errmsg.startswith("Validation error: ")
    assert error_of(KeyError("x")) is None
