"""Who may see the web page, and over what: a token or basic auth, and TLS.

Off by default (the page listens on loopback). With a **token**, a request is let in when it
carries ``Authorization: Bearer <token>`` (scripts, curl) or the ``stackfleet_token`` cookie;
a browser gets the cookie by opening the page once as ``/?token=<token>``, which sets it
(HttpOnly, SameSite=Strict, Secure under TLS) and redirects to the same URL without the token,
so it does not stay in the address bar or the history. With **basic auth** (user and
password), the browser asks for them itself. Either one admits a request when both are set.
Everything else gets 401. Secrets are compared in constant time.

**TLS**: a certificate chain and key file (PEM) make the server speak HTTPS only.
"""

from __future__ import annotations

import base64
import hmac
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

TOKEN_COOKIE = "stackfleet_token"
TOKEN_PARAM = "token"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class WebAccess:
    """The page's access settings; all empty means open (fine on loopback only)."""

    token: str | None = None
    user: str | None = None
    password: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if bool(self.user) != bool(self.password):
            raise ValueError("web basic auth needs both a user and a password")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("web TLS needs both a certificate and a key file")

    @property
    def protected(self) -> bool:
        return bool(self.token or self.user)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None for plain HTTP; a bad file raises here, at start."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def admits(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if self.token:
            if scheme.lower() == "bearer" and _same(credentials.strip(), self.token):
                return True
            if _same(request.cookies.get(TOKEN_COOKIE, ""), self.token):
                return True
        if self.user and self.password and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return _same(user, self.user) & _same(password, self.password)
        return False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.protected:
            return await handler(request)
        offered = request.query.get(TOKEN_PARAM)
        if self.token and offered is not None and _same(offered, self.token):
            # The token from a shared link becomes a cookie; the URL loses it.
            redirect = web.HTTPFound(request.rel_url.without_query_params(TOKEN_PARAM))
            redirect.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict",
                                secure=self.tls_cert is not None)
            raise redirect
        if self.admits(request):
            return await handler(request)
        headers = {"WWW-Authenticate": 'Basic realm="stackfleet", charset="UTF-8"'} if self.user else {}
        return web.json_response({"error": "authentication required"}, status=401, headers=headers)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
