"""``TgtAdm``: the targets, LUNs, ACLs and CHAP accounts of one running tgtd, through
``tgtadm`` (see :mod:`brick.tgt` for the facts about tgt that shape it)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence

from brick.exception import (
    BrickError,
    CommandFailed,
    Conflict,
    InvalidArgument,
    NotFound,
)
from brick.executor import SECRET_FLAGS, Result, execute
from brick.tgt.parse import (
    ALL_INITIATORS,
    Chap,
    Connection,
    Target,
    parse_accounts,
    parse_targets,
    validate_backing_path,
    validate_control_port,
    validate_initiator,
    validate_iqn,
    validate_lun,
)

LOG = logging.getLogger(__name__)

# tgtadm's exit codes: 22 (EINVAL) for every refused request, 107 (ENOTCONN) when no tgtd
# listens on the control socket.
_NOT_CONNECTED = 107
_TARGET_GONE = "can't find the target"
_ACCOUNT_GONE = "can't find the account"
_ALREADY_EXISTS = "already exists"

# -- tgtadm ----------------------------------------------------------------------------------
_LOCKS: dict[int, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(control_port: int) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(control_port, threading.Lock())


def _masked(argv: Sequence[str]) -> list[str]:
    return ["***" if i and argv[i - 1] in SECRET_FLAGS else arg for i, arg in enumerate(argv)]


def _same_file(a: str, b: str) -> bool:
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class TgtAdm:
    """The targets of the tgtd listening on control port ``control_port`` (``tgtadm -C N``).

    Changes made through one ``TgtAdm`` are serialised per control port within the process;
    across processes ``create_target`` retries when another creator takes its tid.
    """

    def __init__(self, control_port: int, *, timeout_s: float = 30.0) -> None:
        self.control_port = validate_control_port(control_port)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"TgtAdm(control_port={self.control_port})"

    def _argv(self, *args: str) -> list[str]:
        return ["tgtadm", "-C", str(self.control_port), "--lld", "iscsi", *args]

    def _run(self, *args: str) -> Result:
        try:
            return execute(self._argv(*args), timeout_s=self.timeout_s)
        except CommandFailed as exc:
            exc.argv = _masked(exc.argv)  # the error may be logged: no CHAP password in it
            if exc.exit_code == _NOT_CONNECTED:
                exc.add_note(f"no tgtd answers on control port {self.control_port}")
            raise

    def answers(self, *, timeout_s: float = 5.0) -> bool:
        """Whether a tgtd answers on this control port (``Timeout`` if one hangs)."""
        argv = self._argv("--op", "show", "--mode", "target")
        return execute(argv, check_exit_code=False, timeout_s=timeout_s).exit_code == 0

    # -- queries -------------------------------------------------------------------------
    def targets(self) -> list[Target]:
        """Every target of this tgtd, read now."""
        return parse_targets(self._run("--op", "show", "--mode", "target").stdout)

    def find(self, iqn: str) -> Target | None:
        iqn = validate_iqn(iqn)
        return next((t for t in self.targets() if t.iqn == iqn), None)

    def connections(self, iqn: str) -> list[Connection]:
        """The initiators connected to ``iqn`` now ([] if there is no such target)."""
        target = self.find(iqn)
        return list(target.connections) if target else []

    def accounts(self) -> list[str]:
        """The CHAP accounts of this tgtd (they are per daemon, bound to targets by name)."""
        return parse_accounts(self._run("--op", "show", "--mode", "account").stdout)

    # -- changes -------------------------------------------------------------------------
    def create_target(
        self,
        iqn: str,
        backing_path: str | os.PathLike[str],
        *,
        lun: int = 1,
        readonly: bool = True,
        initiators: Sequence[str] = (ALL_INITIATORS,),
        chap: Chap | None = None,
    ) -> int:
        """Export ``backing_path`` as LUN ``lun`` of target ``iqn``; return its tid.

        Idempotent: if ``iqn`` is already exported exactly so, its tid is returned. If it
        exists but differs (backing, readonly, ACL, CHAP user), raise ``Conflict``. The
        initiator ACL is bound last, so nobody can log in before the target is complete. On
        any failure, whatever this call created is removed before the error is raised.

        A CHAP account is per tgtd: an existing account with ``chap.user`` that another target
        uses is shared as it is (tgtd cannot show its password), so give every target of one
        daemon the same password per user.
        """
        iqn = validate_iqn(iqn)
        path = validate_backing_path(backing_path)
        lun = validate_lun(lun)
        if not isinstance(readonly, bool):
            raise InvalidArgument("readonly", readonly, "must be a bool")
        if isinstance(initiators, str) or not initiators:
            raise InvalidArgument("initiators", initiators, "must be a non-empty list")
        acl = tuple(dict.fromkeys(validate_initiator(i) for i in initiators))
        if ALL_INITIATORS in acl and len(acl) > 1:
            raise InvalidArgument("initiators", initiators, "ALL excludes other entries")
        if chap is not None and not isinstance(chap, Chap):
            raise InvalidArgument("chap", type(chap).__name__, "must be a Chap")

        with _lock_for(self.control_port):
            for _attempt in range(5):
                current = self.targets()
                existing = next((t for t in current if t.iqn == iqn), None)
                if existing is not None:
                    self._check_same(existing, path, lun, readonly, acl, chap)
                    return existing.tid
                used = {t.tid for t in current}
                tid = next(n for n in range(1, len(used) + 2) if n not in used)
                try:
                    self._run("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
                except CommandFailed as exc:
                    if _ALREADY_EXISTS in exc.stderr:  # another process took the tid or iqn
                        continue
                    raise
                break
            else:
                raise Conflict("target", iqn, "could not get a free tid after 5 attempts")
            try:
                self._fill(tid, path, lun, readonly, acl, chap, current)
                made = next((t for t in self.targets() if t.tid == tid), None)
                if made is None:
                    raise NotFound("target", iqn)
                self._check_same(made, path, lun, readonly, acl, chap)
            except BaseException as exc:
                self._undo(tid, chap, exc)
                raise
        LOG.info(
            "exported %s as %s lun %d (tid %d, %s, acl %s, chap %s)",
            path,
            iqn,
            lun,
            tid,
            "read-only" if readonly else "read-write",
            ",".join(acl),
            chap.user if chap else "none",
        )
        return tid

    def _fill(
        self,
        tid: int,
        path: str,
        lun: int,
        readonly: bool,
        acl: tuple[str, ...],
        chap: Chap | None,
        before: list[Target],
    ) -> None:
        """Complete target ``tid``: CHAP, LUN, readonly, then the ACL that opens it."""
        t, n = str(tid), str(lun)
        if chap is not None:
            in_use = any(
                chap.user in (*x.accounts, *x.outgoing_accounts) for x in before if x.tid != tid
            )
            if not in_use:
                if chap.user in self.accounts():
                    # a stray account (left by a crash): recreate it so our password applies
                    self._run("--op", "delete", "--mode", "account", "--user", chap.user)
                self._run(
                    "--op", "new", "--mode", "account", "--user", chap.user,
                    "--password", chap.password,
                )  # fmt: skip
            self._run("--op", "bind", "--mode", "account", "--tid", t, "--user", chap.user)
        self._run("--op", "new", "--mode", "logicalunit", "--tid", t, "--lun", n, "-b", path)
        if readonly:  # refused on "--op new"; applied before any initiator may log in
            self._run(
                "--op", "update", "--mode", "logicalunit", "--tid", t, "--lun", n,
                "--params", "readonly=1",
            )  # fmt: skip
        for address in acl:
            self._run("--op", "bind", "--mode", "target", "--tid", t, "-I", address)

    def _undo(self, tid: int, chap: Chap | None, exc: BaseException) -> None:
        """Remove target ``tid`` and (if nothing else uses it) the account; notes on ``exc``."""
        try:
            self._delete_tid(tid)
            if chap is not None:
                self._delete_unused_account(chap.user)
        except BrickError as undo_exc:
            exc.add_note(f"undo of target tid {tid} failed too: {undo_exc}")
            LOG.error("could not undo the half-made target tid %d: %s", tid, undo_exc)

    @staticmethod
    def _check_same(
        target: Target,
        path: str,
        lun: int,
        readonly: bool,
        acl: tuple[str, ...],
        chap: Chap | None,
    ) -> None:
        have = target.lun(lun)
        if have is None:
            raise Conflict("target", target.iqn, f"has no LUN {lun} (tid {target.tid})")
        if not _same_file(have.backing_path, path):
            raise Conflict("target", target.iqn, f"LUN {lun} exports {have.backing_path!r}")
        if have.readonly != readonly:
            raise Conflict("target", target.iqn, f"LUN {lun} readonly is {have.readonly}")
        if set(target.acl) != set(acl):
            raise Conflict("target", target.iqn, f"initiator ACL is {list(target.acl)}")
        want = [chap.user] if chap else []
        if sorted(target.accounts) != want:
            raise Conflict("target", target.iqn, f"CHAP accounts are {list(target.accounts)}")

    def delete_target(self, iqn: str) -> None:
        """Remove target ``iqn`` even with initiators connected; "already gone" is success.

        Its CHAP accounts are deleted too unless another target still uses them.
        """
        iqn = validate_iqn(iqn)
        with _lock_for(self.control_port):
            target = self.find(iqn)
            if target is None:
                return
            self._delete_tid(target.tid)
            for user in (*target.accounts, *target.outgoing_accounts):
                self._delete_unused_account(user)
        LOG.info(
            "removed target %s (tid %d, %d connection(s) dropped)",
            iqn,
            target.tid,
            len(target.connections),
        )

    def _delete_tid(self, tid: int) -> None:
        try:
            self._run("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
        except CommandFailed as exc:
            if _TARGET_GONE not in exc.stderr:
                raise

    def _delete_unused_account(self, user: str) -> None:
        targets = self.targets()
        if any(user in (*t.accounts, *t.outgoing_accounts) for t in targets):
            return
        try:
            self._run("--op", "delete", "--mode", "account", "--user", user)
        except CommandFailed as exc:
            if _ACCOUNT_GONE not in exc.stderr:
                raise
