"""Who is calling: the admin, a node bound to one host, or anyone (``noauth``).

Two credentials, both sent in ``X-Auth-Token``:

* the admin token (``[auth] token``): every operation;
* a node token, derived from the cluster secret ``[auth] node_secret``:
  ``node:<host>:<hex HMAC-SHA256(node_secret, host)>``. The host travels inside the token, so
  volt-api checks it without a table; a node token only acts for peer ids of its own host.

Rotating ``node_secret`` invalidates every node token at once (see docs/security.rst).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from volt import validation
from volt.errors import Forbidden, InvalidInput, Unauthenticated

NODE_PREFIX = "node:"
DIGEST_HEX = 64


def _digest(secret: str, host: str) -> str:
    return hmac.new(secret.encode(), host.encode(), hashlib.sha256).hexdigest()


def node_token(secret: str, host: str) -> str:
    """The node token of ``host`` (an IP address or DNS name, stored canonical)."""
    if not secret:
        raise ValueError("node_secret must not be empty")
    canonical = validation.host(host)
    return f"{NODE_PREFIX}{canonical}:{_digest(secret, canonical)}"


@dataclass(frozen=True)
class Credential:
    """``host`` is None for the admin (and under noauth): no host restriction."""

    host: str | None = None

    @property
    def admin(self) -> bool:
        return self.host is None

    def require_admin(self, what: str) -> None:
        if not self.admin:
            raise Forbidden(f"{what} needs the admin credential; node tokens cannot do it")

    def own_host(self, host: str | None, field: str = "host") -> str | None:
        """``host`` if this caller may act for it; the token's host when ``host`` is None.
        Raises Forbidden for another host's name: nothing is changed."""
        if self.host is None:
            return host
        if host is not None and host != self.host:
            raise Forbidden(f"{field} {host!r} is not the host of this node token ({self.host})")
        return self.host


ADMIN = Credential()


class Authenticator:
    """Checks ``X-Auth-Token`` (constant-time compares); None tokens disable a kind."""

    def __init__(self, admin_token: str | None, node_secret: str | None) -> None:
        self.admin_token = admin_token.encode() if admin_token else None
        self.node_secret = node_secret or None

    @property
    def enabled(self) -> bool:
        return self.admin_token is not None

    def authenticate(self, given: str) -> Credential:
        if not self.enabled:
            return ADMIN
        if given and hmac.compare_digest(given.encode(), self.admin_token or b""):
            return ADMIN
        if self.node_secret and given.startswith(NODE_PREFIX):
            host, _, digest = given[len(NODE_PREFIX) :].rpartition(":")
            if len(digest) == DIGEST_HEX and host:
                want = _digest(self.node_secret, host)
                if hmac.compare_digest(digest.encode(), want.encode()):
                    try:
                        return Credential(validation.host(host))
                    except InvalidInput:
                        pass  # a signed but malformed host: only a broken issuer makes one
        raise Unauthenticated("missing or wrong X-Auth-Token")
