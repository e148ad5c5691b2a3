"""Who is calling: bearer (or basic) tokens, compared in constant time.

Every token has a name (``REWARDQ_API_TOKENS=team-a:TOKEN,team-b:TOKEN``). The name, never
the token, labels the caller's metrics and rides in its items' metadata
(:data:`TOKEN_NAME_KEY`) into dead letters, so a team can tell who spent what.

Two ways to present a token, because the remote-RM clients cannot set headers:

- ``Authorization: Bearer TOKEN`` (curl, agent frameworks, ``/v1/score``);
- ``Authorization: Basic base64(NAME:TOKEN)``, which aiohttp sends by itself for a URL
  with credentials, so ``--remote_rm_url http://team-a:TOKEN@host:8000/get_reward``
  (OpenRLHF) and ``--rm-url http://team-a:TOKEN@host:8000/slime/reward`` (slime) work
  unchanged. The password is the token; the user name is not checked.

Comparison: the presented token's SHA-256 is compared with every configured token's
with ``hmac.compare_digest``, all of them, whatever matches; so the time taken depends
neither on how much of a token is right nor on which token it is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from rewardq.gateway.errors import error_response

#: The item metadata key that carries the caller's token name to the workers and into
#: dead letters (metadata is not part of the judge cache key).
TOKEN_NAME_KEY = "rewardq_token_name"
#: The caller name when the gateway runs without tokens (loopback only).
ANONYMOUS = "anonymous"


class TokenTable:
    """The configured tokens; :meth:`identify` names the caller of a request.

    Args:
        tokens: token name -> token (``Settings.api_token_names``); empty = no auth,
            every caller is :data:`ANONYMOUS`.
    """

    def __init__(self, tokens: Mapping[str, SecretStr]) -> None:
        self._digests = [(name, _digest(token.get_secret_value()))
                         for name, token in tokens.items()]

    @property
    def enabled(self) -> bool:
        """Whether requests must present a token."""
        return bool(self._digests)

    def identify(self, authorization: str | None) -> str | None:
        """The token name for an ``Authorization`` header value; ``None`` when it names
        nobody (missing, malformed or wrong). :data:`ANONYMOUS` when auth is off."""
        if not self._digests:
            return ANONYMOUS
        presented = presented_token(authorization)
        if presented is None:
            return None
        digest = _digest(presented)
        found: str | None = None
        for name, expected in self._digests:  # no early exit: every token is compared
            if hmac.compare_digest(digest, expected):
                found = name
        return found


def presented_token(authorization: str | None) -> str | None:
    """The token in a ``Bearer`` or ``Basic`` (its password) ``Authorization`` value."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest's time then depends on nothing secret.
    return hashlib.sha256(token.encode("utf-8")).digest()


class AuthMiddleware:
    """ASGI middleware: 401 unless the request names a token (paths in ``public`` pass).

    Sets ``scope["state"]["token_name"]`` for everything inside it.

    Args:
        app: the ASGI app it wraps.
        tokens: the configured tokens.
        public: paths that need no token (health probes, API docs).
    """

    def __init__(self, app: ASGIApp, tokens: TokenTable, public: frozenset[str]) -> None:
        self.app = app
        self.tokens = tokens
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        name = self.tokens.identify(Headers(scope=scope).get("authorization"))
        if name is None:
            response = error_response(
                401, "unauthorized", "a valid token is required: 'Authorization: Bearer "
                "TOKEN', or NAME:TOKEN@ in the URL (HTTP basic auth)",
                headers={"WWW-Authenticate": 'Bearer realm="rewardq", Basic realm="rewardq"'})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["token_name"] = name
        await self.app(scope, receive, send)


def token_name(scope: Scope) -> str | None:
    """The caller's token name, once :class:`AuthMiddleware` has seen the request."""
    state = scope.get("state") or {}
    name = state.get("token_name")
    return name if isinstance(name, str) else None
