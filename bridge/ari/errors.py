"""Typed ARI errors: one class per HTTP status the swagger files document, so callers can catch
exactly the case they handle (a 404 on teardown is "already gone", a 422 on addChannel is "not in
Stasis yet") and let the rest surface."""

from __future__ import annotations


class AriError(Exception):
    """An ARI request failed. ``status`` is the HTTP status (0 when Asterisk was not reachable)."""

    status: int = 0

    def __init__(self, method: str, path: str, message: str, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        super().__init__(f"ARI {method} {path} -> {self.status or 'unreachable'}: {message}")
        self.method = method
        self.path = path
        self.message = message


class AriUnavailable(AriError):
    """Connection refused, reset or timed out: Asterisk (or its HTTP server) is down."""


class AriBadRequest(AriError):
    status = 400


class AriUnauthorized(AriError):
    status = 401


class AriNotFound(AriError):
    status = 404


class AriConflict(AriError):
    status = 409


class AriPreconditionFailed(AriError):
    status = 412


class AriUnprocessable(AriError):
    status = 422


class AriServerError(AriError):
    status = 500


_BY_STATUS: dict[int, type[AriError]] = {
    400: AriBadRequest,
    401: AriUnauthorized,
    403: AriUnauthorized,
    404: AriNotFound,
    409: AriConflict,
    412: AriPreconditionFailed,
    422: AriUnprocessable,
}


def error_for_status(status: int, method: str, path: str, message: str) -> AriError:
    """The typed error for an HTTP error status (5xx and unlisted 4xx keep their real status)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = AriServerError if status >= 500 else AriError
    return cls(method, path, message, status=status)
