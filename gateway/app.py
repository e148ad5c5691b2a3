"""The gateway's Starlette app: HTTP in, the worker fleet behind, results out.

One :class:`~rewardq.producer.async_client.AsyncRewardClient` per process, created in the
app's lifespan on the serving event loop, does every submit: a request of many items is
one batch submit (its chunks go out at once), while one-sample requests (the remote-RM
clients send one per rollout) await per-item scores that the client coalesces across
concurrent requests into chunks. Every scoring request answers only once each item is
scored or has failed for good, or at its deadline: transient judge failures are sent to
the fleet again meanwhile (:mod:`rewardq.gateway.scoring`), and a request waits for a live
worker. The process keeps no state of its own beyond counters and its queues: any number
of gateways can serve behind a load balancer.

Middleware, outermost first: accounting (metrics) → body limit (413) → auth (401) →
routes. A scoring route then takes a slot of its token's queue (:mod:`rewardq.gateway.limits`):
it waits its turn there, and only a queue over its abuse-sized bounds answers 429.
Endpoints:

====================  ====  =========================================================
``/v1/score``         POST  ``{"items", "step", "timeout_s", "partial"}`` →
                            ``{"results": [...]}`` in input order
``/v1/score/stream``  POST  the same, each result an NDJSON line when it is known
``/get_reward``       POST  OpenRLHF's remote RM (:mod:`rewardq.gateway.openrlhf`)
``/slime/reward``     POST  slime's remote RM (:mod:`rewardq.gateway.slime`)
``/healthz``          GET   the process is up
``/readyz``           GET   Redis reachable and ≥ 1 live worker, else 503
``/metrics``          GET   Prometheus (:mod:`rewardq.gateway.metrics`)
``/openapi.json``     GET   the OpenAPI document; ``/docs`` renders it
====================  ====  =========================================================
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis
from pydantic import BaseModel, TypeAdapter
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rewardq.broker.app import QUEUE_JUDGE
from rewardq.broker.connections import redis_client
from rewardq.broker.errors import RewardqError
from rewardq.broker.fleet import live_workers
from rewardq.broker.schemas import ScoreItem, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.gateway import openrlhf, slime
from rewardq.gateway.auth import ANONYMOUS, AuthMiddleware, TokenTable, token_name
from rewardq.gateway.errors import GatewayRequestError, fleet_error
from rewardq.gateway.limits import BodyLimitMiddleware, TokenQueues
from rewardq.gateway.metrics import AccountingMiddleware, GatewayMetrics
from rewardq.gateway.openapi import DOCS_HTML, openapi_document
from rewardq.gateway.remote_rm import RewardMapping
from rewardq.gateway.schemas import (
    EndLine,
    ResultLine,
    ScoreRequest,
    check_each,
    check_items,
    parse_request,
)
from rewardq.gateway.scoring import FleetScorer, Progress
from rewardq.producer.async_client import DEFAULT_WINDOW_S, AsyncRewardClient

#: Paths any caller may read: probes, docs, and Prometheus' scrape (like the workers' and
#: Flower's /metrics: counts labelled by token *names*, never a token).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/metrics"})
#: The remote-RM paths: an old-style OpenRLHF request holds a whole step.
REMOTE_RM_PATHS = ("/get_reward", "/slime/reward")
#: How long /readyz waits for Redis before it answers 503.
READY_TIMEOUT_S = 3.0
#: Bodies larger than this are parsed on a thread, so the loop keeps serving meanwhile.
THREAD_PARSE_BYTES = 1024 * 1024
#: Remote-RM requests of more items than this are validated on a thread too.
PER_ITEM_CHECKS_ON_LOOP = 256
_RESULTS = TypeAdapter(list[ScoreResult])
_M = TypeVar("_M", bound=BaseModel)

_Method = Callable[["Gateway", Request], Awaitable[Response]]


def _replies_errors(endpoint: _Method) -> _Method:
    """Turn the gateway's and the fleet's errors into their JSON error replies."""
    @functools.wraps(endpoint)
    async def wrapped(self: Gateway, request: Request) -> Response:
        try:
            return await endpoint(self, request)
        except GatewayRequestError as exc:
            return exc.response()
        except RewardqError as exc:
            return fleet_error(exc).response()
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
        self.queues = TokenQueues(settings.gateway_token_concurrency,
                                  max_items=settings.gateway_token_queue_items,
                                  max_bytes=settings.gateway_token_queue_bytes,
                                  retry_after_s=settings.gateway_retry_after_s)
        self.metrics = GatewayMetrics()
        self.metrics.watch_in_flight(self.queues.in_flight, self.queues.queued)
        self.metrics.watch_chunks(self._chunks_sent)
        self._batch_chunks = 0
        self.mapping = RewardMapping.from_settings(settings)
        self._client: AsyncRewardClient | None = None
        self._scorer: FleetScorer | None = None
        self._probe: redis.Redis | None = None

    @property
    def client(self) -> AsyncRewardClient:
        """The fleet client (exists while the app is serving)."""
        if self._client is None:
            raise RuntimeError("the gateway is not serving (lifespan not started)")
        return self._client

    @property
    def scorer(self) -> FleetScorer:
        """Scoring with retries within a deadline (exists while the app is serving)."""
        if self._scorer is None:
            raise RuntimeError("the gateway is not serving (lifespan not started)")
        return self._scorer

    def _chunks_sent(self) -> int:
        per_item = self._client.chunks_sent if self._client is not None else 0
        return self._batch_chunks + per_item

    def _count_chunks(self, chunks: int) -> None:
        self._batch_chunks += chunks

    def _has_workers(self) -> bool:
        assert self._probe is not None
        return bool(live_workers(self._probe, QUEUE_JUDGE))

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Create the fleet client on the serving loop; close it at shutdown."""
        self._client = AsyncRewardClient(self.settings, window_s=self.window_s)
        self._probe = redis_client(self.settings, socket_timeout=READY_TIMEOUT_S)
        self._scorer = FleetScorer(self._client, self._has_workers,
                                   on_rescore=self.metrics.items_rescored.inc,
                                   on_chunks=self._count_chunks)
        try:
            yield
        finally:
            await self._client.aclose()
            self._probe.close()
            self._client = self._scorer = None

    # ------------------------------------------------------------------ scoring

    async def _parse(self, model: type[_M], body: bytes) -> _M:
        if len(body) > THREAD_PARSE_BYTES:
            return await asyncio.to_thread(parse_request, model, body)
        return parse_request(model, body)

    @asynccontextmanager
    async def _admitted(self, caller: str, items: int, nbytes: int, deadline: float,
                        ) -> AsyncIterator[None]:
        """Hold a slot of ``caller``'s queue (waiting for it within ``deadline``)."""
        def expired() -> GatewayRequestError:
            return GatewayRequestError(
                504, "timeout", f"waited in token {caller!r}'s queue until the request's "
                f"deadline (REWARDQ_GATEWAY_TOKEN_CONCURRENCY="
                f"{self.settings.gateway_token_concurrency} requests are scored at once)")
        async with self.queues.admit(caller, items=items, nbytes=nbytes, deadline=deadline,
                                     on_expired=expired):
            yield

    async def _score_request(self, request: Request) -> tuple[ScoreRequest, list[ScoreItem],
                                                              float, str, int]:
        """Parse and check a ``/v1/score`` body: request, items, deadline, caller, size."""
        started = time.monotonic()
        raw = await request.body()
        body = await self._parse(ScoreRequest, raw)
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
        items = check_items(body.items, caller)
        return body, items, started + (body.timeout_s or limit), caller, len(raw)

    @_replies_errors
    async def score(self, request: Request) -> Response:
        """``POST /v1/score``: every result, in input order."""
        body, items, deadline, caller, size = await self._score_request(request)
        results: list[ScoreResult | None] = [None] * len(items)
        progress = Progress()
        async with self._admitted(caller, len(items), size, deadline):
            async for i, result in self.scorer.results(items, deadline, step=body.step,
                                                       progress=progress):
                results[i] = result
        if progress.expired and not body.partial:
            raise await self._deadline_error(progress, len(items))
        final = [r for r in results if r is not None]
        self.metrics.count_results(caller, final)
        return Response(b'{"results":' + _RESULTS.dump_json(final) + b"}",
                        media_type="application/json")

    @_replies_errors
    async def score_stream(self, request: Request) -> Response:
        """``POST /v1/score/stream``: NDJSON, one line per result as it is final."""
        body, items, deadline, caller, size = await self._score_request(request)
        metrics, scorer = self.metrics, self.scorer
        slot = _Slot(self._admitted(caller, len(items), size, deadline))
        await slot.take()  # before the 200: a full queue is still a 429
        progress = Progress()

        async def lines() -> AsyncIterator[bytes]:
            sent = 0
            held = 0
            end: dict[str, Any] = {}
            try:
                async for i, result in scorer.results(items, deadline, step=body.step,
                                                      progress=progress):
                    if i in progress.expired and not body.partial:
                        held += 1
                        continue
                    sent += 1
                    metrics.count_results(caller, [result])
                    yield _line(ResultLine(index=i, result=result,
                                           pending_chunks=progress.pending_chunks()))
            except RewardqError as exc:
                err = fleet_error(exc)
                end = {"error": err.code, "message": err.message}
            finally:
                await slot.give()
            if held:
                err = await self._deadline_error(progress, len(items))
                end = {"error": err.code, "message": err.message}
            yield _line(EndLine(count=sent, chunks=progress.chunks,
                                cache_hits=progress.cache_hits, **end))

        return _ReleasingStream(lines(), slot, media_type="application/x-ndjson")

    async def _score_each(self, raw_items: list[dict[str, Any]], caller: str, nbytes: int,
                          deadline: float) -> list[ScoreResult]:
        """Final results of a remote-RM request's items, each validated alone (an invalid
        one fails alone), within ``deadline``."""
        if len(raw_items) > PER_ITEM_CHECKS_ON_LOOP:
            checked = await asyncio.to_thread(check_each, raw_items, caller)
        else:
            checked = check_each(raw_items, caller)
        results: list[ScoreResult | None] = [
            c if isinstance(c, ScoreResult) else None for c in checked]
        valid = [(i, c) for i, c in enumerate(checked) if isinstance(c, ScoreItem)]
        progress = Progress()
        async with self._admitted(caller, len(checked), nbytes, deadline):
            async for n, result in self.scorer.results([c for _, c in valid], deadline,
                                                       progress=progress):
                results[valid[n][0]] = result
        if progress.expired:
            err = await self._deadline_error(progress, len(checked))
            if err.status == 503:  # the fleet was away: no reward to map
                raise err
        final = [r for r in results if r is not None]
        self.metrics.count_results(caller, final)
        return final

    async def _deadline_error(self, progress: Progress, total: int) -> GatewayRequestError:
        """The reply to a request whose items were not all final at its deadline: 503
        when the fleet was away (no live worker, Redis unreachable), else 504."""
        unscored = list(progress.expired.values())
        no_workers = all(u.no_workers for u in unscored)
        if not no_workers and not any(u.broker for u in unscored):
            try:  # a wait shorter than the fleet client's own check finds it out here
                no_workers = not await asyncio.to_thread(self._has_workers)
            except (redis.RedisError, RewardqError):
                no_workers = False
        last = unscored[0].reason if unscored else "no result"
        counted = f"{len(unscored)} of {total} item(s) not scored before the request's deadline"
        if no_workers:
            return GatewayRequestError(503, "no_workers",
                                       f"{counted}: no live rewardq worker consumes "
                                       f"{QUEUE_JUDGE!r} (last: {last})")
        if all(u.no_workers or u.broker for u in unscored):
            return GatewayRequestError(503, "broker_unavailable", f"{counted}: {last}")
        return GatewayRequestError(504, "timeout", f"{counted} (transient failures were "
                                   f"retried until then; last: {last}); the fleet keeps "
                                   f"working and a retry finds the verdicts cached")

    def _deadline(self, started: float, mapping: RewardMapping) -> float:
        return started + (mapping.timeout_s or self.settings.gateway_rm_timeout_s)

    def _remote_mapping(self, request: Request) -> RewardMapping:
        return self.mapping.with_query(request.query_params,
                                       max_timeout_s=self.settings.chunk_deadline_s)

    @_replies_errors
    async def openrlhf(self, request: Request) -> Response:
        """``POST /get_reward``: OpenRLHF's remote reward model."""
        started = time.monotonic()
        mapping = self._remote_mapping(request)
        raw = await request.body()
        body = await self._parse(openrlhf.OpenRLHFRequest, raw)
        if len(body.query) > self.settings.gateway_rm_max_items:
            raise GatewayRequestError(
                413, "too_large", f"{len(body.query)} queries; at most "
                f"{self.settings.gateway_rm_max_items} per request "
                "(REWARDQ_GATEWAY_RM_MAX_ITEMS; or split the step: --remote_rm_url URL,URL)")
        caller = token_name(request.scope) or ANONYMOUS
        items, mismatched = openrlhf.to_items(body, mapping,
                                              f"openrlhf-{uuid.uuid4().hex[:12]}")
        if mismatched:
            self.metrics.prompt_not_in_query.labels(caller).inc(mismatched)
        results = await self._score_each(items, caller, len(raw),
                                         self._deadline(started, mapping))
        reply = openrlhf.to_reply(results, mapping)
        return Response(reply.model_dump_json(exclude_none=True),
                        media_type="application/json")

    @_replies_errors
    async def slime(self, request: Request) -> Response:
        """``POST /slime/reward``: slime's remote reward model."""
        started = time.monotonic()
        mapping = self._remote_mapping(request)
        raw = await request.body()
        body = await self._parse(slime.SlimeRequest, raw)
        caller = token_name(request.scope) or ANONYMOUS
        item = slime.to_item(body, mapping, f"slime-{uuid.uuid4().hex[:12]}")
        [result] = await self._score_each([item], caller, len(raw),
                                          self._deadline(started, mapping))
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
        Middleware(BodyLimitMiddleware, max_bytes=settings.gateway_max_body_bytes,
                   per_path={path: (settings.gateway_rm_max_body_bytes,
                                    "REWARDQ_GATEWAY_RM_MAX_BODY_BYTES")
                             for path in REMOTE_RM_PATHS}),
        Middleware(AuthMiddleware, tokens=gateway.tokens, public=PUBLIC_PATHS),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=gateway.lifespan)
    app.state.gateway = gateway
    return app


class _Slot:
    """A token-queue slot held across a streaming response: given back exactly once,
    when the stream ends or when the response ends however it ends (a client that
    disconnects before the first line included)."""

    def __init__(self, admission: Any) -> None:
        self._admission = admission
        self._held = False

    async def take(self) -> None:
        await self._admission.__aenter__()
        self._held = True

    async def give(self) -> None:
        if self._held:
            self._held = False
            await self._admission.__aexit__(None, None, None)


class _ReleasingStream(StreamingResponse):
    """A streaming response that gives its token-queue slot back when it ends."""

    def __init__(self, content: AsyncIterator[bytes], slot: _Slot, *, media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self._slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._slot.give()


def _line(model: ResultLine | EndLine) -> bytes:
    return model.model_dump_json(exclude_none=True).encode() + b"\n"
