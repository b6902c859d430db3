"""Who is calling: API keys (default), a trusted proxy header, or the development switch.

Every endpoint needs a caller except the operational ones (probes, metrics and the OpenAPI
document), which carry no tenant data.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aiohttp import web

from adapters_manifest.record import check_name
from gateway.auth.keys import KeyRing, Principal
from gateway.errors import AuthenticationError

log = logging.getLogger(__name__)

PRINCIPAL = web.RequestKey("principal", Principal)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
DEV_PRINCIPAL = Principal(user="dev", admin=True)


class Authenticator(Protocol):
    def authenticate(self, request: web.Request) -> Principal:
        """The caller, or AuthenticationError."""


class ApiKeyAuthenticator:
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def authenticate(self, request: web.Request) -> Principal:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.")
        principal = self.keys.principal_for(key.strip())
        if principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        return principal


class TrustedHeaderAuthenticator:
    """Behind a proxy that authenticates callers and sets these headers (and strips them from clients)."""

    def __init__(self, user_header: str, admin_header: str | None) -> None:
        self.user_header = user_header
        self.admin_header = admin_header

    def authenticate(self, request: web.Request) -> Principal:
        # Exactly one of each: a second one may be the client's own, passed on by a proxy that
        # adds its header instead of replacing it, and which of the two counts is then a guess.
        users = request.headers.getall(self.user_header, [])
        admins = [] if self.admin_header is None else request.headers.getall(self.admin_header, [])
        try:
            if len(users) != 1 or len(admins) > 1:
                raise ValueError("not exactly one")
            check_name(users[0], "user")
        except ValueError:
            raise AuthenticationError(f"The authenticating proxy sent no valid user in {self.user_header}.") from None
        return Principal(user=users[0], admin=[a.lower() for a in admins] == ["true"])


class NoAuthenticator:
    """The development switch: everyone is the admin user 'dev'. Never in production."""

    def authenticate(self, request: web.Request) -> Principal:
        return DEV_PRINCIPAL


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path not in OPEN_PATHS:
        request[PRINCIPAL] = request.app[AUTHENTICATOR].authenticate(request)
    return await handler(request)
