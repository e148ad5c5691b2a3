"""Limits on what one request, and one token, may ask of the gateway.

- :class:`BodyLimitMiddleware`: a body over its path's limit is refused with 413 before
  it is read (by its ``Content-Length``) or as soon as the bytes received pass the limit
  (chunked uploads), so no oversize body is ever held in memory. The remote-RM paths
  have limits of their own (an old-style OpenRLHF request holds a whole step).
- :class:`TokenQueues`: backpressure, not refusal. Scoring requests are queued work: each
  token has ``concurrency`` requests being scored at once, and the rest wait in the
  token's own queue, first in, first out, for as long as their deadline allows. What a
  token holds in a gateway process (waiting or being scored) is bounded in items and in
  body bytes; only a request beyond those bounds, which are sized for abuse rather than
  for a training step, is answered 429 with ``Retry-After``. Each token has its own
  slots, so one trainer's step cannot hold another's requests back. The counts are per
  gateway process: N processes behind a load balancer allow N times as much.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rewardq.gateway.errors import GatewayRequestError, error_response


class BodyTooLargeError(Exception):
    """The request body passed the limit while it was being read."""


@dataclass
class _TokenQueue:
    """One token's requests: those being scored, those waiting, and what they hold."""

    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)
    items: int = 0
    bytes: int = 0


class TokenQueues:
    """Per-token admission of scoring requests (one event loop).

    Args:
        concurrency: requests of one token scored at once; more wait their turn.
        max_items: items one token may hold (waiting or being scored) before a 429.
        max_bytes: body bytes one token may hold before a 429.
        retry_after_s: the ``Retry-After`` of that 429.
    """

    def __init__(self, concurrency: int, *, max_items: int, max_bytes: int,
                 retry_after_s: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.retry_after_s = retry_after_s
        self._queues: dict[str, _TokenQueue] = {}

    @asynccontextmanager
    async def admit(self, name: str, *, items: int, nbytes: int, deadline: float,
                    on_expired: Callable[[], GatewayRequestError]) -> AsyncIterator[None]:
        """Hold one of ``name``'s slots while the block runs, waiting for one if needed.

        Args:
            name: the token's name.
            items: the request's item count.
            nbytes: the request's body size.
            deadline: ``time.monotonic()`` by which the request must be answered; waiting
                past it raises ``on_expired()``.
            on_expired: the error of a request whose deadline passed in the queue.

        Raises:
            GatewayRequestError: 429 when the token's queue would pass its bounds; the
                ``on_expired()`` error when the deadline passed while waiting.
        """
        queue = self._queues.setdefault(name, _TokenQueue())
        if queue.items + items > self.max_items or queue.bytes + nbytes > self.max_bytes:
            self._drop_if_idle(name, queue)
            raise GatewayRequestError(
                429, "too_many_requests",
                f"token {name!r} holds {queue.items} items ({queue.bytes} bytes) in this "
                f"gateway, and this request's {items} ({nbytes} bytes) would pass its bounds "
                f"(REWARDQ_GATEWAY_TOKEN_QUEUE_ITEMS={self.max_items}, "
                f"REWARDQ_GATEWAY_TOKEN_QUEUE_BYTES={self.max_bytes}); retry later",
                headers={"Retry-After": str(self.retry_after_s)})
        queue.items += items
        queue.bytes += nbytes
        try:
            await self._take_slot(queue, deadline, on_expired)
            try:
                yield
            finally:
                self._give_slot(queue)
        finally:
            queue.items -= items
            queue.bytes -= nbytes
            self._drop_if_idle(name, queue)

    async def _take_slot(self, queue: _TokenQueue, deadline: float,
                         on_expired: Callable[[], GatewayRequestError]) -> None:
        if queue.running < self.concurrency and not queue.waiting:
            queue.running += 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.waiting.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._give_slot(queue)  # handed a slot just as it gave up: pass it on
            else:
                turn.cancel()
                queue.waiting.remove(turn)
            if isinstance(exc, TimeoutError):
                raise on_expired() from None
            raise

    def _give_slot(self, queue: _TokenQueue) -> None:
        """Hand the slot to the next waiting request, or free it."""
        while queue.waiting:
            turn = queue.waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on: ``running`` is unchanged
                return
        queue.running -= 1

    def _drop_if_idle(self, name: str, queue: _TokenQueue) -> None:
        if not queue.running and not queue.waiting and not queue.items:
            self._queues.pop(name, None)

    def in_flight(self) -> dict[str, int]:
        """Requests each token has in this process, waiting or being scored."""
        return {name: q.running + len(q.waiting) for name, q in self._queues.items()
                if q.running or q.waiting}

    def queued(self) -> dict[str, int]:
        """Requests each token has waiting for a slot."""
        return {name: len(q.waiting) for name, q in self._queues.items() if q.waiting}


def _too_large(limit: int, setting: str) -> str:
    return f"the request body is larger than {limit} bytes ({setting})"


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a request body over its path's limit.

    Args:
        app: the ASGI app it wraps.
        max_bytes: the limit of any path not in ``per_path``.
        per_path: path -> (limit, the setting that sets it).
    """

    def __init__(self, app: ASGIApp, max_bytes: int,
                 per_path: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.per_path.get(
            scope["path"], (self.max_bytes, "REWARDQ_GATEWAY_MAX_BODY_BYTES"))
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await error_response(413, "too_large", _too_large(limit, setting))(
                scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
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
            await error_response(413, "too_large", _too_large(limit, setting))(
                scope, receive, send)
