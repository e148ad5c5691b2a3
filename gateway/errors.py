"""Error replies: one JSON shape for every 4xx/5xx, and which status each error gets.

Every error body is ``{"error": CODE, "message": TEXT, ...}`` (``problems`` added for
invalid items, naming each item's index, id and field). Statuses:

====  ======================  ===================================================
code  ``error``               when
====  ======================  ===================================================
400   ``bad_json``            the body is not JSON (or not UTF-8)
401   ``unauthorized``        no token, or not a configured one
413   ``too_large``           body or item count over the endpoint's limit
422   ``invalid_request``     the request's own fields (``items``, ``step``...), or
                              a remote-RM label with no reference in it (``label``)
422   ``invalid_items``       ``/v1/score`` items failing the broker's validation;
                              nothing enqueued
429   ``too_many_requests``   the token's queue is over its item or byte bounds
                              (``Retry-After``); within them requests wait
502   ``not_scored``          a remote-RM item failed for good (``items`` says which
                              and why) and no ``gateway_failed_reward`` is set
503   ``no_workers``          no live worker consumed the queue until the deadline
503   ``broker_unavailable``  Redis could not be reached until the deadline
504   ``timeout``             results not all in within the request's deadline
                              (transient failures were retried until then)
====  ======================  ===================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from rewardq.broker.errors import (
    BrokerUnavailableError,
    ChunksLostError,
    NoWorkersError,
    RewardqError,
    ScoringTimeoutError,
)


class GatewayRequestError(Exception):
    """A request the gateway answers with an error reply of its own."""

    def __init__(self, status: int, code: str, message: str, *,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> JSONResponse:
        """This error's JSON reply."""
        return error_response(self.status, self.code, self.message, headers=self.headers,
                              **self.extra)


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
