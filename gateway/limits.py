"""Limits on what one request, and one token, may ask of the gateway.

- :class:`BodyLimitMiddleware`: a body over ``gateway_max_body_bytes`` is refused with
  413 before it is read (by its ``Content-Length``) or as soon as the bytes received pass
  the limit (chunked uploads), so no oversize body is ever held in memory.
- :class:`TokenConcurrencyMiddleware`: each token may have ``gateway_token_concurrency``
  requests in flight (a streaming reply counts until its last line); one more is
  answered 429 with ``Retry-After``, at once, without touching the fleet. The count is
  per gateway process: N processes behind a load balancer allow N times as many.
"""

from __future__ import annotations

from collections import Counter

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import token_name
from gateway.errors import error_response


class BodyTooLargeError(Exception):
    """The request body passed the limit while it was being read."""


class ConcurrencyLimiter:
    """Requests in flight per token name, at most ``limit`` each (one event loop)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._in_flight: Counter[str] = Counter()

    def try_acquire(self, name: str) -> bool:
        """Take a slot for ``name``; False when all of its slots are taken."""
        if self._in_flight[name] >= self.limit:
            return False
        self._in_flight[name] += 1
        return True

    def release(self, name: str) -> None:
        """Give back a slot taken by :meth:`try_acquire`."""
        self._in_flight[name] -= 1
        if self._in_flight[name] <= 0:
            del self._in_flight[name]

    def in_flight(self) -> dict[str, int]:
        """Slots each token name holds now."""
        return dict(self._in_flight)


def _too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes (REWARDQ_GATEWAY_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a request body over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, "too_large", _too_large(self.max_bytes))(
                scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLargeError:
            if started:
                raise
            await error_response(413, "too_large", _too_large(self.max_bytes))(
                scope, receive, send)


class TokenConcurrencyMiddleware:
    """ASGI middleware: 429 with ``Retry-After`` beyond a token's concurrency limit.

    Args:
        app: the ASGI app it wraps (inside :class:`~gateway.auth.AuthMiddleware`).
        limiter: the per-token counts.
        retry_after_s: the ``Retry-After`` of a 429, in whole seconds.
        exempt: paths that take no slot (health probes, metrics, docs).
    """

    def __init__(self, app: ASGIApp, limiter: ConcurrencyLimiter, retry_after_s: int,
                 exempt: frozenset[str]) -> None:
        self.app = app
        self.limiter = limiter
        self.retry_after_s = retry_after_s
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = token_name(scope) if scope["type"] == "http" else None
        if name is None or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if not self.limiter.try_acquire(name):
            response = error_response(
                429, "too_many_requests",
                f"token {name!r} has {self.limiter.limit} requests in flight, its limit "
                f"(REWARDQ_GATEWAY_TOKEN_CONCURRENCY); retry later",
                headers={"Retry-After": str(self.retry_after_s)})
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(name)
