"""Errors of virtman's API. ``code`` is the original's result code: 1 warning, 2 failure."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from brick.exception import Conflict as BrickConflict


class VirtmanError(Exception):
    code = 2


class InvalidInput(VirtmanError):
    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"invalid {field} {value!r}: {rule}")


class InstanceExists(VirtmanError):
    code = 1

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Virtman: the instance_name '{name}' already exists!")


class InstanceNotFound(VirtmanError):
    code = 1

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"Virtman: the instance_name '{name}' does not exist!")


class ImageBuildFailed(VirtmanError):
    def __init__(self, image: str, reason: str) -> None:
        self.image, self.reason = image, reason
        super().__init__(f"Virtman: create base image '{image}' failed: {reason}")


class ParentsUnavailable(VirtmanError):
    def __init__(self, image: str, timeout_s: float, why: str | None = None) -> None:
        super().__init__(
            f"Volt did not place {image}: {why}"
            if why
            else f"Volt did not place {image} within {timeout_s:g} s"
        )


class JournalCorrupt(VirtmanError):
    """The journal cannot be read: the daemon must not start (nor overwrite it)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        super().__init__(
            f"the journal {path} is unreadable: {reason}; it is left untouched and "
            "virtmanserver does not start (see 'Recovering from a corrupt journal' in "
            "docs/virtman.rst)"
        )


class Conflict(VirtmanError):
    """A layer's object of that name exists and is not what was asked (another origin,
    size or owner): it is left alone, never replaced; only an explicit teardown removes it."""

    def __init__(self, name: str, reason: str, message: str | None = None) -> None:
        self.name, self.reason = name, reason
        super().__init__(message or f"Virtman: {name}: {reason}")


class DiskExists(Conflict):
    """A disk of that name is on the node without a journal record (kept, never replaced)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            name,
            "a disk of that name exists without a journal record",
            f"Virtman: a disk for the instance_name '{name}' already exists on this node "
            "without a record (kept from an earlier run): move it away first",
        )


@contextmanager
def adopting(name: str) -> Iterator[None]:
    """A layer's step over brick: an object of ours that brick found in place but different
    (``brick.exception.Conflict``) is the layer's ``Conflict`` for ``name``."""
    try:
        yield
    except BrickConflict as exc:
        raise Conflict(name, str(exc)) from exc


# -- guests (virtman.guest.manager; the z/VM-shaped API maps these to its codes) ---------------
class GuestNotFound(InstanceNotFound):
    """No guest of that userid is recorded on this node."""

    def __init__(self, userid: str) -> None:
        super().__init__(userid)
        self.userid = userid
        self.args = (f"Virtman: the guest '{userid}' does not exist",)


class GuestExists(InstanceExists):
    """A guest of that userid is recorded already."""

    def __init__(self, userid: str) -> None:
        super().__init__(userid)
        self.userid = userid
        self.args = (f"Virtman: the guest '{userid}' already exists",)


class GuestStateError(VirtmanError):
    """The guest cannot do that now (no disk deployed yet, not running, ...)."""

    def __init__(self, userid: str, reason: str) -> None:
        self.userid, self.reason = userid, reason
        super().__init__(f"Virtman: guest '{userid}': {reason}")


class HypervisorError(VirtmanError):
    """The hypervisor behind the node's guests (libvirt) refused or failed."""


class HypervisorUnreachable(HypervisorError):
    """No connection to the hypervisor behind the node's guests (libvirtd down, bad URI)."""
