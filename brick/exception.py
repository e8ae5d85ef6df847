"""The errors of brick: host-side block plumbing (targets, storage daemons, commands).

Every error carries typed fields and builds its message from them. Callers add context with
``err.add_note(...)`` rather than wrapping.
"""

from __future__ import annotations

from collections.abc import Sequence


class BrickError(Exception):
    """Root of every error raised by brick."""


class NotFound(BrickError):
    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name
        super().__init__(f"{kind} {name!r} does not exist")


class Conflict(BrickError):
    """An object with our name exists but differs from what was asked for."""

    def __init__(self, kind: str, name: str, detail: str) -> None:
        self.kind, self.name, self.detail = kind, name, detail
        super().__init__(f"{kind} {name!r} exists and differs: {detail}")


class InvalidArgument(BrickError, ValueError):
    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field, self.value, self.rule = field, value, rule
        super().__init__(f"invalid {field} {value!r}: {rule}")


class CommandFailed(BrickError):
    def __init__(self, argv: Sequence[str], exit_code: int, stderr: str) -> None:
        self.argv, self.exit_code, self.stderr = list(argv), exit_code, stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        super().__init__(f"{argv[0]} exited with {exit_code}: {tail}")


class Timeout(BrickError):
    def __init__(self, what: str, timeout_s: float) -> None:
        self.what, self.timeout_s = what, timeout_s
        super().__init__(f"timed out after {timeout_s:g} s waiting for {what}")


class PathsUnavailable(BrickError):
    def __init__(self, image: str, tried: Sequence[str]) -> None:
        self.image, self.tried = image, list(tried)
        super().__init__(f"no path to {image} works (tried {', '.join(tried) or 'none'})")


class NotPermitted(BrickError):
    """A privileged entry point refused a request outside its allow-list.

    Its ``args`` are the constructor's, so the privsep channel (which re-raises an error from
    its class path and ``args``) rebuilds it unchanged in the caller."""

    def __init__(self, entrypoint: str, value: str, rule: str) -> None:
        self.entrypoint, self.value, self.rule = entrypoint, value, rule
        self.message = f"{entrypoint} refused {value!r}: {rule}"
        super().__init__(entrypoint, value, rule)

    def __str__(self) -> str:
        return self.message
