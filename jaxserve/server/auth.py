"""Who may call the server: an API key for the OpenAI routes, a peer secret for hand-over.

`--api_key` (or JAXSERVE_API_KEY), as `vllm serve --api-key` does, guards every `/v1` route:
clients send `Authorization: Bearer <key>`. `/health` and `/metrics` stay open for probes
and scrapers. The peer route that takes over another server's requests
(`/v1/requests/import`) trusts what it receives, so it needs its own secret, shared by the
servers that hand requests to each other (`--peer_secret` or JAXSERVE_PEER_SECRET); without
one it is closed. Keys are compared in constant time.
"""
from __future__ import annotations

import hmac
from typing import Optional

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from jaxserve.server.errors import APIError, error_response

PEER_ROUTE = "/v1/requests/import"


def bearer(headers: Headers) -> Optional[str]:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: Optional[str], expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Credentials:
    """ASGI middleware: 401 for a `/v1` call without the API key (when one is set), 401/403 for
    the peer route without the peer secret."""

    def __init__(self, app: ASGIApp, api_key: Optional[str] = None, peer_secret: Optional[str] = None):
        self.app, self.api_key, self.peer_secret = app, api_key or None, peer_secret or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # methods no route serves go on to the router (405), whoever asks
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD", "POST"):
            refusal = self.refusal(scope["path"], Headers(scope=scope))
            if refusal is not None:
                return await error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, path: str, headers: Headers) -> Optional[APIError]:
        if path.rstrip("/") == PEER_ROUTE:
            if self.peer_secret is None:
                return APIError(403, "taking over requests is disabled: start both servers with the same "
                                     "--peer_secret", code="peer_disabled")
            if not _matches(bearer(headers), self.peer_secret):
                return APIError(401, "the peer secret is missing or wrong (Authorization: Bearer <secret>)",
                                code="invalid_peer_secret", headers={"WWW-Authenticate": "Bearer"})
            return None
        if self.api_key is not None and path.startswith("/v1") and not _matches(bearer(headers), self.api_key):
            return APIError(401, "the API key is missing or wrong (Authorization: Bearer <key>)",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None
