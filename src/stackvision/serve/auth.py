"""The API key: where a client may send it, and a constant-time check.

With a key set, every route but ``/health`` requires it, as the ``X-API-Key`` header, an
``Authorization: Bearer KEY`` header, or the ``api_key`` query parameter (so the web page and
``/docs`` can be opened in a browser). Without one, the server should listen on loopback only.
"""

import hmac  # no `from __future__ import annotations`: FastAPI reads the annotations below

from .requests import ApiError

API_KEY_ENV = "STACKVISION_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
HEADER = "X-API-Key"


def presented_key(request, header_key: str | None) -> str | None:
    """The key the client sent, in order of preference: header, bearer token, query."""
    if header_key:
        return header_key
    auth = request.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return bearer or request.query_params.get("api_key") or None


def check_key(given: str | None, expected: str) -> None:
    """Raise a 401 :class:`ApiError` unless ``given`` is ``expected``."""
    if not given:
        raise ApiError(401, "missing API key", "send it in the X-API-Key header (or ?api_key=KEY)")
    # compare_digest takes as long for a near miss as for a wild guess: no timing oracle.
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "wrong API key", "use the key the server was started with")


def key_dependency(api_key: str | None):
    """A FastAPI dependency enforcing ``api_key`` (no-op without one).

    Declared through :class:`fastapi.security.APIKeyHeader` so OpenAPI shows the scheme.
    """
    from fastapi import Depends, Request
    from fastapi.security import APIKeyHeader

    scheme = APIKeyHeader(name=HEADER, auto_error=False)

    def require_key(request: Request, header_key: str | None = Depends(scheme)) -> None:
        if api_key:
            check_key(presented_key(request, header_key), api_key)

    return require_key
