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
    def __init__(self, image: str, timeout_s: float) -> None:
        super().__init__(f"Volt did not place {image} within {timeout_s:g} s")
