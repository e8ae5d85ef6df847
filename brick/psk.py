"""Pre-shared keys for TLS on NBD, in QEMU's ``keys.psk`` format.

A file of lines ``<identity>:<key in hex>`` (what ``tls-creds-psk`` and libnbd's
``tls-psk-file`` read); the first line's identity is the one a client presents. QEMU wants
the file named ``keys.psk`` in a directory of its own (``dir=``), so ``install`` copies the
operator's file there.

A server's ``tls-creds-psk`` also wants Diffie-Hellman parameters: without a
``dh-params.pem`` in that directory QEMU generates 2048-bit ones inside ``object-add``
(0.1-0.2 s here, but tens of seconds under TCG: a guest's daemon missed its 30 s QMP
deadline and was left without its NBD server). ``install`` writes RFC 7919's ``ffdhe2048``
group there, a public standard group: loading it takes milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from pathlib import Path

from brick.exception import InvalidArgument

FILENAME = "keys.psk"
DH_FILENAME = "dh-params.pem"
# RFC 7919 ffdhe2048 (what ``openssl genpkey -genparam -algorithm DH -pkeyopt
# group:ffdhe2048`` prints): public, standard, nothing secret.
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
_LINE = re.compile(r"([A-Za-z0-9._@-]{1,64}):([0-9a-fA-F]{32,1024})")
KEY_BYTES = 32  # 256-bit keys by default


def make_line(identity: str) -> str:
    """A new ``identity:hexkey`` line with a random 256-bit key."""
    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", identity):
        raise InvalidArgument("identity", identity, "must be 1-64 of A-Za-z0-9._@-")
    return f"{identity}:{secrets.token_hex(KEY_BYTES)}\n"


def parse(text: str) -> list[str]:
    """The identities of a ``keys.psk`` text, first one first; ``InvalidArgument`` if a
    line is not ``identity:hexkey`` (at least 128-bit keys) or there is none."""
    identities = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line.strip())
        if m is None or len(m.group(2)) % 2:
            raise InvalidArgument(
                "psk file",
                f"line {number}",
                f"line {number} must be identity:hexkey (32+ hex digits)",
            )
        identities.append(m.group(1))
    if not identities:
        raise InvalidArgument("psk file", "(empty)", "must hold an identity:hexkey line")
    return identities


def read(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(text, first identity)`` of a key file, which must be a regular file readable by
    its owner only (mode 0600 or 0400); ``InvalidArgument`` otherwise."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise InvalidArgument(
            "nbd_psk_file", str(path), f"cannot be read: {exc.strerror}"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidArgument("nbd_psk_file", str(path), "must be a regular file")
    if info.st_mode & 0o077:
        raise InvalidArgument(
            "nbd_psk_file", str(path), f"is mode {info.st_mode & 0o777:04o}: must be 0600"
        )
    text = path.read_text()
    try:
        return text, parse(text)[0]
    except InvalidArgument as exc:
        raise InvalidArgument("nbd_psk_file", str(path), exc.rule) from None


def install(source: str | os.PathLike[str], directory: str | os.PathLike[str]) -> tuple[Path, str]:
    """Copy ``source`` to ``<directory>/keys.psk`` and write the DH parameters beside it
    (directory 0700, files 0600, each replaced atomically when it differs); returns
    ``(directory, first identity)``."""
    text, identity = read(source)
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    _write(directory / FILENAME, text)
    _write(directory / DH_FILENAME, FFDHE2048)
    return directory, identity


def _write(target: Path, text: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if target.read_text() == text and (os.stat(target).st_mode & 0o777) == 0o600:
            return
    tmp = target.with_name(f".{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def uninstall(directory: str | os.PathLike[str]) -> None:
    """Remove what ``install`` made: its two files and the directory if empty."""
    directory = Path(directory)
    (directory / FILENAME).unlink(missing_ok=True)
    (directory / DH_FILENAME).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError, OSError):
        directory.rmdir()


def write_new(path: str | os.PathLike[str], identity: str) -> None:
    """Write a new key file (mode 0600) with one random key for ``identity``; refuses to
    replace an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make_line(identity))
