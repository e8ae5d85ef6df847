"""Errors of virtman's API. ``code`` is the original's result code: 1 warning, 2 failure."""

from __future__ import annotations


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


class DiskExists(VirtmanError):
    """A disk of that name is on the node without a journal record (kept, never replaced)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"Virtman: a disk for the instance_name '{name}' already exists on this node "
            "without a record (kept from an earlier run): move it away first"
        )


class GuestNotFound(InstanceNotFound):
    """No guest (z/VM-shaped userid) of that name on this node."""


class GuestExists(InstanceExists):
    """A guest of that userid is already recorded on this node."""


class GuestStateError(VirtmanError):
    """The guest cannot do that now (e.g. start of a guest with no disk yet)."""
