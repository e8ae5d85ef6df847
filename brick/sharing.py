"""Which processes use a machine-wide daemon now, so that the last one out stops it.

Several test sessions share the one ``qemu:///system`` libvirtd; a session that stopped it on
its way out pulled it from under the others (their guests' deletes failed with "libvirt
unreachable", their console logs stopped). ``SharedUse(folder)`` keeps one file per user in
``folder`` (``<pid>-<token>``, holding the pid and its start time, so that a reused pid is not
taken for a live user) and changes them under an exclusive ``flock`` of ``folder/lock``:
``join`` and ``leave`` run inside ``locked()``, as do the start and stop they decide.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from brick.daemon import start_time
from brick.exception import InvalidArgument


class SharedUse:
    def __init__(self, folder: Path | str) -> None:
        text = os.fspath(folder)
        if not isinstance(text, str) or not os.path.isabs(text):
            raise InvalidArgument("folder", folder, "must be an absolute path")
        self.folder = Path(text)
        self.entry: Path | None = None  # ours, while joined

    def __repr__(self) -> str:
        return f"SharedUse({str(self.folder)!r})"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (blocks while another process holds it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "a") as lock:  # never deleted: one inode for all
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def join(self) -> None:
        """Count this process as a user (idempotent)."""
        if self.entry is not None:
            return
        pid = os.getpid()
        entry = self.folder / f"{pid}-{secrets.token_hex(4)}"
        entry.write_text(f"{pid} {start_time(pid)}\n")
        self.entry = entry

    def leave(self) -> bool:
        """Stop counting this process; whether no other live user is left (entries of ended
        processes are dropped on the way)."""
        if self.entry is not None:
            self.entry.unlink(missing_ok=True)
            self.entry = None
        return not self.others()

    def others(self) -> list[int]:
        """The pids of the other live users."""
        live = []
        for entry in sorted(self.folder.glob("*-*")):
            if entry == self.entry:
                continue
            try:
                pid_text, started = entry.read_text().split()
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, started = 0, ""
            if pid > 0 and str(start_time(pid)) == started:
                live.append(pid)
            else:  # ended (or not an entry of ours): not a user any more
                entry.unlink(missing_ok=True)
        return live
