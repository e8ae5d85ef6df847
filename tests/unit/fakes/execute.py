"""A scripted stand-in for ``brick.executor.execute``: records every argv and answers
from replies matched by argv prefix."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from brick.exception import CommandFailed
from brick.executor import Result


@dataclass
class Reply:
    prefix: tuple[str, ...]
    stdout: str = ""
    stderr: str = ""
    rc: int = 0
    times: int | None = None  # None: every time
    effect: Callable[[], None] | None = None


@dataclass
class FakeExecute:
    """Records (argv, stdin) and answers from scripted replies (first match wins)."""

    replies: list[Reply] = field(default_factory=list)
    calls: list[tuple[list[str], str | None]] = field(default_factory=list)

    def on(self, *prefix: str, **kw: object) -> FakeExecute:
        self.replies.append(Reply(tuple(prefix), **kw))  # type: ignore[arg-type]
        return self

    def __call__(
        self,
        argv: Sequence[str],
        *,
        check_exit_code: bool | Sequence[int] = True,
        timeout_s: float = 60.0,
        stdin: str | None = None,
    ) -> Result:
        self.calls.append((list(argv), stdin))
        reply = Reply(())
        for candidate in self.replies:
            if tuple(argv[: len(candidate.prefix)]) == candidate.prefix and candidate.times != 0:
                if candidate.times is not None:
                    candidate.times -= 1
                reply = candidate
                break
        if reply.effect is not None:
            reply.effect()
        allowed = (0,) if check_exit_code is True else check_exit_code or ()
        if check_exit_code is not False and reply.rc not in allowed:
            raise CommandFailed(argv, reply.rc, reply.stderr)
        return Result(reply.stdout, reply.stderr, reply.rc)

    @property
    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]
