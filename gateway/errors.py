"""Error replies: one JSON shape for every 4xx/5xx, and which status each error gets.

Every error body is ``{"error": CODE, "message": TEXT, ...}`` (``problems`` added for
invalid items, naming each item's index, id and field). Statuses:

====  ======================  ===================================================
code  ``error``               when
====  ======================  ===================================================
400   ``bad_json``            the body is not JSON (or not UTF-8)
401   ``unauthorized``        no token, or not a configured one
413   ``too_large``           body over ``gateway_max_body_bytes``, or more items
                              than ``gateway_max_items``
422   ``invalid_request``     the request's own fields (``items``, ``step``...)
422   ``invalid_items``       items failing the broker's validation; nothing enqueued
429   ``too_many_requests``   the token's concurrency is used up (``Retry-After``)
502   ``not_scored``          a remote-RM item ended failed/invalid/timeout and no
                              ``gateway_failed_reward`` is set (the client retries)
503   ``no_workers``          no live worker consumes the queue
503   ``broker_unavailable``  Redis cannot be reached
504   ``timeout``             results not all in within the request's timeout
====  ======================  ===================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from broker.errors import (
    BrokerUnavailableError,
    ChunksLostError,
    NoWorkersError,
    RewardqError,
    ScoringTimeoutError,
)


class GatewayRequestError(Exception):
    """A request the gateway answers with an error reply of its own."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def error_response(status: int, code: str, message: str, *,
                   headers: Mapping[str, str] | None = None, **extra: Any) -> JSONResponse:
    """The JSON error reply ``{"error": code, "message": message, **extra}``."""
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status,
                        headers=dict(headers or {}))


def fleet_error(exc: RewardqError) -> GatewayRequestError:
    """The reply for an error the fleet client raised while scoring."""
    if isinstance(exc, ScoringTimeoutError):
        return GatewayRequestError(504, "timeout", str(exc))
    if isinstance(exc, NoWorkersError):
        return GatewayRequestError(503, "no_workers", str(exc))
    if isinstance(exc, BrokerUnavailableError | ChunksLostError):
        return GatewayRequestError(503, "broker_unavailable", str(exc))
    return GatewayRequestError(500, "internal", f"{type(exc).__name__}: {exc}")
