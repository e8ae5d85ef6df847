"""``image_import`` from an ``http://`` or ``https://`` URL (the connector's HTTP backend):
the file is fetched into a new file of this node, never over an existing one.

Fetched under a hidden partial name next to the destination and linked into place when
complete (mode 0444: an image never changes once exported); any failure removes the partial
file. At most ``max_bytes`` are taken (a longer answer is refused, not cut); redirects are
followed only to other http(s) URLs; every read waits at most ``timeout_s``.

A node fetches only from the URL prefixes its operator lists (``zvm_image_import_url_prefixes``):
anyone holding the API's credential could otherwise make it fetch from any address it can
reach (its management network, a cloud's metadata service). A redirect is checked the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from virtman.errors import InvalidInput

SCHEMES = ("http", "https")
CHUNK = 1 << 20
IMAGE_MODE = 0o444


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        if urlsplit(newurl).scheme not in SCHEMES:
            raise InvalidInput("url", req.full_url, f"redirects to {newurl}: not http(s)")
        if not allowed(newurl, self.prefixes):
            raise InvalidInput(
                "url", req.full_url, f"redirects to {newurl}: not under an allowed prefix"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def allowed(url: str, prefixes: Sequence[str]) -> bool:
    """Whether ``url`` is one of ``prefixes`` or below one of them at a ``/`` boundary
    (``http://images.example/`` does not allow ``http://images.example.evil/``)."""
    for prefix in prefixes:
        bounded = prefix if prefix.endswith("/") else prefix + "/"
        if url == prefix or url.startswith(bounded):
            return True
    return False


def check_url(value: str, prefixes: Sequence[str], field: str = "url") -> str:
    """An http(s) URL with a host, no fragment, under one of the allowed ``prefixes``."""
    parts = urlsplit(value)
    if parts.scheme not in SCHEMES or not parts.hostname or parts.fragment:
        raise InvalidInput(field, value, "must be an http:// or https:// URL with a host")
    if {".", ".."} & set(unquote(parts.path).split("/")):
        # a server resolves them: /allowed/../elsewhere would pass a prefix check
        raise InvalidInput(field, value, "must not have . or .. path segments")
    if not allowed(value, prefixes):
        why = (
            "is not under any of zvm_image_import_url_prefixes"
            if prefixes
            else "cannot be fetched: this node allows no URL sources "
            "(zvm_image_import_url_prefixes is empty)"
        )
        raise InvalidInput(field, value, why)
    return value


def fetch(
    url: str, dest: Path, *, prefixes: Sequence[str], max_bytes: int, timeout_s: float
) -> tuple[int, str]:
    """Fetch ``url`` into the new file ``dest``; its (size, md5 hex digest). ``InvalidInput``
    naming ``url`` if it or a redirect is not allowed, the server fails or the answer is too
    long, ``FileExistsError`` if ``dest`` appeared meanwhile, ``OSError`` if it cannot be
    written."""
    check_url(url, prefixes)
    part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    opener = urllib.request.build_opener(_CheckedRedirects(prefixes))
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        with opener.open(url, timeout=timeout_s) as answer, open(part, "xb") as out:
            length = answer.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise InvalidInput("url", url, f"is {length} bytes: more than {max_bytes}")
            while chunk := answer.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise InvalidInput("url", url, f"sends more than {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(part, IMAGE_MODE)
        os.link(part, dest)
    except urllib.error.HTTPError as exc:
        raise InvalidInput("url", url, f"the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InvalidInput("url", url, f"cannot be fetched: {reason}") from None
    finally:
        with contextlib.suppress(OSError):
            part.unlink()
    return size, digest.hexdigest()
