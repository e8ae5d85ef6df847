"""The connector's token handshake, backed by the node's ``api_token``.

``POST /token`` with ``X-Admin-Token: <api_token>`` answers an ``X-Auth-Token`` valid for
``ttl_s`` seconds: ``vmt1.<expiry>.<nonce>.<HMAC-SHA256(api_token, "vmt1.<expiry>.<nonce>")>``
(zvmconnector treats it as opaque). Every other request carries ``X-Auth-Token``: such a token,
or ``api_token`` itself (as XML-RPC callers send it). Nothing is stored: a restart keeps issued
tokens valid until they expire; changing ``api_token`` revokes them all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

PREFIX = "vmt1"


class TokenAuth:
    def __init__(
        self, api_token: str, ttl_s: int = 3600, clock: Callable[[], float] = time.time
    ) -> None:
        self.key = api_token.encode("utf-8")
        self.ttl_s = ttl_s
        self.clock = clock

    def issue(self, admin_token: str | None) -> str | None:
        """A new token if ``admin_token`` is the node's credential, else None."""
        if not admin_token or not self._equal(admin_token, self.key):
            return None
        body = f"{PREFIX}.{int(self.clock()) + self.ttl_s}.{secrets.token_hex(8)}"
        return f"{body}.{self._sign(body)}"

    def check(self, token: str | None) -> bool:
        """Whether ``token`` (the X-Auth-Token header) lets a request through."""
        if not token:
            return False
        if self._equal(token, self.key):
            return True
        body, _, signature = token.rpartition(".")
        parts = body.split(".")
        if len(parts) != 3 or parts[0] != PREFIX or not parts[1].isdigit():
            return False
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return False
        return int(parts[1]) > self.clock()

    def _sign(self, body: str) -> str:
        return hmac.new(self.key, body.encode("utf-8"), hashlib.sha256).hexdigest()

    @staticmethod
    def _equal(given: str, key: bytes) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "replace"), key)
