"""Volt's domain errors. Each carries a stable machine code and the HTTP status it maps to.

The ``code`` strings are part of the API: do not change their values.
"""


class VoltError(Exception):
    status = 500
    code = "volt.internal"
    title = "Internal Server Error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(VoltError):
    status = 400
    code = "volt.invalid_input"
    title = "Bad Request"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid {field!r}: {reason}")
        self.field = field


class MalformedBody(VoltError):
    status = 400
    code = "volt.malformed_body"
    title = "Bad Request"


class Unauthenticated(VoltError):
    status = 401
    code = "volt.unauthenticated"
    title = "Unauthorized"


class Forbidden(VoltError):
    """Authenticated, but this credential may not do that (a node token acting for another
    host, or an admin-only operation)."""

    status = 403
    code = "volt.auth.forbidden"
    title = "Forbidden"


class VolumeNotFound(VoltError):
    status = 404
    code = "volt.volume.not_found"
    title = "Not Found"

    def __init__(self, volume_id: str) -> None:
        super().__init__(f"volume {volume_id!r} has no tree")
        self.volume_id = volume_id


class PeerNotFound(VoltError):
    status = 404
    code = "volt.peer.not_found"
    title = "Not Found"

    def __init__(self, volume_id: str, peer_id: str) -> None:
        super().__init__(f"peer {peer_id!r} is not in the tree of volume {volume_id!r}")


class NotPlaceable(VoltError):
    """A register that places (``place``) found no place yet (btree executors): query and
    retry as before."""

    status = 409
    code = "volt.peer.not_placeable"
    title = "Conflict"

    def __init__(self, volume_id: str, peer_id: str) -> None:
        super().__init__(f"peer {peer_id!r} cannot be placed in volume {volume_id!r} yet")


class RouteNotFound(VoltError):
    status = 404
    code = "volt.route.not_found"
    title = "Not Found"


class MethodNotAllowed(VoltError):
    status = 405
    code = "volt.method_not_allowed"
    title = "Method Not Allowed"

    def __init__(self, detail: str, allowed: list[str]) -> None:
        super().__init__(detail)
        self.allowed = allowed


class Conflict(VoltError):
    status = 409
    code = "volt.conflict"
    title = "Conflict"


class BodyTooLarge(VoltError):
    status = 413
    code = "volt.body_too_large"
    title = "Payload Too Large"


class BodyTimeout(VoltError):
    """The client did not send its announced body within ``request_body_timeout``."""

    status = 408
    code = "volt.body_timeout"
    title = "Request Timeout"


class StoreUnavailable(VoltError):
    status = 503
    code = "volt.store.unavailable"
    title = "Service Unavailable"
