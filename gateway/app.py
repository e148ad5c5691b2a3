"""The gateway's Starlette app: HTTP in, the worker fleet behind, results out.

One :class:`~producer.async_client.AsyncRewardClient` per process, created in the
app's lifespan on the serving event loop, does every submit: a ``/v1/score`` request
is one batch submit (its chunks go out at once), while the remote-RM endpoints, which
get one sample per request, await per-item scores that the client coalesces across
concurrent requests into chunks. The process keeps no state of its own beyond
counters: any number of gateways can serve behind a load balancer.

Middleware, outermost first: accounting (metrics) → body limit (413) → auth (401) →
per-token concurrency (429) → routes. Endpoints:

====================  ====  =========================================================
``/v1/score``         POST  ``{"items", "step", "timeout_s", "partial"}`` →
                            ``{"results": [...]}`` in input order
``/v1/score/stream``  POST  the same, each result an NDJSON line when it is known
``/get_reward``       POST  OpenRLHF's remote RM (:mod:`gateway.openrlhf`)
``/slime/reward``     POST  slime's remote RM (:mod:`gateway.slime`)
``/healthz``          GET   the process is up
``/readyz``           GET   Redis reachable and ≥ 1 live worker, else 503
``/metrics``          GET   Prometheus (:mod:`gateway.metrics`)
``/openapi.json``     GET   the OpenAPI document; ``/docs`` renders it
====================  ====  =========================================================
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.app import QUEUE_JUDGE
from broker.connections import redis_client
from broker.errors import RewardqError, ScoringTimeoutError
from broker.fleet import live_workers
from broker.schemas import ResultStatus, ScoreItem, ScoreResult
from broker.settings import Settings
from gateway import openrlhf, slime
from gateway.auth import ANONYMOUS, AuthMiddleware, TokenTable, token_name
from gateway.errors import GatewayRequestError, error_response, fleet_error
from gateway.limits import BodyLimitMiddleware, ConcurrencyLimiter, TokenConcurrencyMiddleware
from gateway.metrics import AccountingMiddleware, GatewayMetrics
from gateway.openapi import DOCS_HTML, openapi_document
from gateway.remote_rm import RewardMapping
from gateway.schemas import (
    EndLine,
    ResultLine,
    ScoreRequest,
    check_items,
    parse_request,
)
from producer.async_client import DEFAULT_WINDOW_S, AsyncRewardClient
from producer.client import PendingScores

#: Paths any caller may read: probes, docs, and Prometheus' scrape (like the workers' and
#: Flower's /metrics: counts labelled by token *names*, never a token).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/metrics"})
#: Paths that take no slot of a token's concurrency.
UNLIMITED_PATHS = PUBLIC_PATHS
#: How long /readyz waits for Redis before it answers 503.
READY_TIMEOUT_S = 3.0
_RESULTS = TypeAdapter(list[ScoreResult])

_Method = Callable[["Gateway", Request], Awaitable[Response]]


def _replies_errors(endpoint: _Method) -> _Method:
    """Turn the gateway's and the fleet's errors into their JSON error replies."""
    @functools.wraps(endpoint)
    async def wrapped(self: Gateway, request: Request) -> Response:
        try:
            return await endpoint(self, request)
        except GatewayRequestError as exc:
            return error_response(exc.status, exc.code, exc.message, **exc.extra)
        except RewardqError as exc:
            err = fleet_error(exc)
            return error_response(err.status, err.code, err.message)
    return wrapped


class Gateway:
    """The endpoints, and what they share: settings, the fleet client, the metrics.

    Args:
        settings: Redis, chunking and the ``gateway_*`` limits and mapping.
        window_s: how long a per-item score waits for others to share its chunk.
    """

    def __init__(self, settings: Settings, *, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.settings = settings
        self.window_s = window_s
        self.tokens = TokenTable(settings.api_token_names)
        self.limiter = ConcurrencyLimiter(settings.gateway_token_concurrency)
        self.metrics = GatewayMetrics()
        self.metrics.watch_in_flight(self.limiter.in_flight)
        self.metrics.watch_chunks(self._chunks_sent)
        self._batch_chunks = 0
        self.mapping = RewardMapping.from_settings(settings)
        self._client: AsyncRewardClient | None = None
        self._probe: redis.Redis | None = None

    @property
    def client(self) -> AsyncRewardClient:
        """The fleet client (exists while the app is serving)."""
        if self._client is None:
            raise RuntimeError("the gateway is not serving (lifespan not started)")
        return self._client

    def _chunks_sent(self) -> int:
        per_item = self._client.chunks_sent if self._client is not None else 0
        return self._batch_chunks + per_item

    async def _submit(self, items: list[ScoreItem], step: int | None) -> PendingScores:
        pending = await self.client.submit(items, step=step)
        self._batch_chunks += pending.chunk_count
        return pending

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Create the fleet client on the serving loop; close it at shutdown."""
        self._client = AsyncRewardClient(self.settings, window_s=self.window_s)
        self._probe = redis_client(self.settings, socket_timeout=READY_TIMEOUT_S)
        try:
            yield
        finally:
            await self._client.aclose()
            self._probe.close()
            self._client = None

    # ------------------------------------------------------------------ scoring

    async def _score_request(self, request: Request) -> tuple[ScoreRequest, list[ScoreItem],
                                                              float, str]:
        """Parse and check a ``/v1/score`` body: request, items, timeout, caller."""
        body = parse_request(ScoreRequest, await request.body())
        if len(body.items) > self.settings.gateway_max_items:
            raise GatewayRequestError(
                413, "too_large", f"{len(body.items)} items; at most "
                f"{self.settings.gateway_max_items} per request (REWARDQ_GATEWAY_MAX_ITEMS)")
        limit = self.settings.chunk_deadline_s
        if body.timeout_s is not None and body.timeout_s > limit:
            raise GatewayRequestError(422, "invalid_request", "the request is invalid",
                                      problems=[{"field": "timeout_s", "message":
                                                 f"at most {limit} (REWARDQ_CHUNK_DEADLINE_S)"}])
        caller = token_name(request.scope) or ANONYMOUS
        return body, check_items(body.items, caller), body.timeout_s or limit, caller

    @_replies_errors
    async def score(self, request: Request) -> Response:
        """``POST /v1/score``: every result, in input order."""
        body, items, timeout, caller = await self._score_request(request)
        pending = await self._submit(items, body.step)
        results: list[ScoreResult | None] = [None] * len(items)
        try:
            async for i, result in self.client.as_completed(pending, timeout=timeout):
                results[i] = result
        except ScoringTimeoutError:
            if not body.partial:
                raise
        final = [r if r is not None else _timed_out(items[i]) for i, r in enumerate(results)]
        self.metrics.count_results(caller, final)
        return Response(b'{"results":' + _RESULTS.dump_json(final) + b"}",
                        media_type="application/json")

    @_replies_errors
    async def score_stream(self, request: Request) -> Response:
        """``POST /v1/score/stream``: NDJSON, one line per result as it is known."""
        body, items, timeout, caller = await self._score_request(request)
        pending = await self._submit(items, body.step)
        client, metrics = self.client, self.metrics

        async def lines() -> AsyncIterator[bytes]:
            sent: set[int] = set()
            end: dict[str, Any] = {}
            try:
                async for i, result in client.as_completed(pending, timeout=timeout):
                    sent.add(i)
                    metrics.count_results(caller, [result])
                    yield _line(ResultLine(index=i, result=result,
                                           pending_chunks=len(pending.pending_task_ids)))
            except ScoringTimeoutError as exc:
                if body.partial:
                    for i, item in enumerate(items):
                        if i not in sent:
                            late = _timed_out(item)
                            metrics.count_results(caller, [late])
                            yield _line(ResultLine(index=i, result=late, pending_chunks=0))
                            sent.add(i)
                else:
                    end = {"error": "timeout", "message": str(exc)}
            except RewardqError as exc:
                err = fleet_error(exc)
                end = {"error": err.code, "message": err.message}
            yield _line(EndLine(count=len(sent), chunks=pending.chunk_count,
                                cache_hits=pending.cache_hits_at_submit, **end))

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def _score_each(self, raw_items: list[dict[str, Any]], caller: str,
                          ) -> list[ScoreResult]:
        """Per-item scores (coalesced with every concurrent request) within the remote-RM
        timeout."""
        items = check_items(raw_items, caller)
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(self.client.score(item) for item in items)),
                timeout=self.settings.gateway_rm_timeout_s)
        except TimeoutError:
            raise GatewayRequestError(
                504, "timeout", f"no score within {self.settings.gateway_rm_timeout_s}s "
                "(REWARDQ_GATEWAY_RM_TIMEOUT_S); the fleet keeps working and a retry finds "
                "the cached verdict") from None
        self.metrics.count_results(caller, results)
        return list(results)

    @_replies_errors
    async def openrlhf(self, request: Request) -> Response:
        """``POST /get_reward``: OpenRLHF's remote reward model."""
        mapping = self.mapping.with_query(request.query_params)
        body = parse_request(openrlhf.OpenRLHFRequest, await request.body())
        if len(body.query) > self.settings.gateway_max_items:
            raise GatewayRequestError(413, "too_large", f"{len(body.query)} queries; at most "
                                      f"{self.settings.gateway_max_items} per request")
        caller = token_name(request.scope) or ANONYMOUS
        raw, mismatched = openrlhf.to_items(body, mapping, f"openrlhf-{uuid.uuid4().hex[:12]}")
        if mismatched:
            self.metrics.prompt_not_in_query.labels(caller).inc(mismatched)
        results = await self._score_each(raw, caller)
        reply = openrlhf.to_reply(results, mapping)
        return Response(reply.model_dump_json(), media_type="application/json")

    @_replies_errors
    async def slime(self, request: Request) -> Response:
        """``POST /slime/reward``: slime's remote reward model."""
        mapping = self.mapping.with_query(request.query_params)
        body = parse_request(slime.SlimeRequest, await request.body())
        caller = token_name(request.scope) or ANONYMOUS
        raw = slime.to_item(body, mapping, f"slime-{uuid.uuid4().hex[:12]}")
        [result] = await self._score_each([raw], caller)
        reply = slime.to_reply(result, mapping,
                               as_dict=request.query_params.get("reply") == "dict")
        return JSONResponse(reply)

    # ------------------------------------------------------------------ operations

    async def healthz(self, _request: Request) -> Response:
        """``GET /healthz``: the process serves requests."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        """``GET /readyz``: 200 when Redis answers and a live worker consumes the queue."""
        assert self._probe is not None
        try:
            beats = await asyncio.wait_for(
                asyncio.to_thread(live_workers, self._probe, QUEUE_JUDGE), READY_TIMEOUT_S)
        except (redis.RedisError, TimeoutError) as exc:
            return JSONResponse({"ready": False, "redis": False, "workers": 0,
                                 "message": f"Redis unreachable: {exc or 'timed out'}"},
                                status_code=503)
        if not beats:
            return JSONResponse({"ready": False, "redis": True, "workers": 0,
                                 "message": f"no live worker consumes {QUEUE_JUDGE!r}"},
                                status_code=503)
        return JSONResponse({"ready": True, "redis": True, "workers": len(beats)})

    async def prometheus(self, _request: Request) -> Response:
        """``GET /metrics``."""
        return Response(self.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, _request: Request) -> Response:
        """``GET /openapi.json``."""
        return JSONResponse(openapi_document())

    async def docs(self, _request: Request) -> Response:
        """``GET /docs``: Swagger UI over ``/openapi.json``."""
        return HTMLResponse(DOCS_HTML)


def create_app(settings: Settings, *, window_s: float = DEFAULT_WINDOW_S) -> Starlette:
    """The gateway ASGI app for ``settings`` (serve it with uvicorn: ``rewardq serve``).

    Raises:
        ConfigError: ``REWARDQ_API_TOKENS`` is malformed.
    """
    gateway = Gateway(settings, window_s=window_s)
    routes = [
        Route("/v1/score", gateway.score, methods=["POST"]),
        Route("/v1/score/stream", gateway.score_stream, methods=["POST"]),
        Route("/get_reward", gateway.openrlhf, methods=["POST"]),
        Route("/slime/reward", gateway.slime, methods=["POST"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/readyz", gateway.readyz, methods=["GET"]),
        Route("/metrics", gateway.prometheus, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
        Route("/docs", gateway.docs, methods=["GET"]),
    ]
    middleware = [
        Middleware(AccountingMiddleware, metrics=gateway.metrics,
                   endpoints=frozenset(r.path for r in routes)),
        Middleware(BodyLimitMiddleware, max_bytes=settings.gateway_max_body_bytes),
        Middleware(AuthMiddleware, tokens=gateway.tokens, public=PUBLIC_PATHS),
        Middleware(TokenConcurrencyMiddleware, limiter=gateway.limiter,
                   retry_after_s=settings.gateway_retry_after_s, exempt=UNLIMITED_PATHS),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=gateway.lifespan)
    app.state.gateway = gateway
    return app


def _timed_out(item: ScoreItem) -> ScoreResult:
    return ScoreResult.failure(item.id, ResultStatus.TIMEOUT,
                               "no result before the request's timeout_s")


def _line(model: ResultLine | EndLine) -> bytes:
    return model.model_dump_json(exclude_none=True).encode() + b"\n"

