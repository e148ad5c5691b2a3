"""The local judge's HTTP application: chat completions, models, stats and admin routes.

- ``POST /v1/chat/completions``: grade the request (``rewardq.judge_server.grading``) and answer
  a ``chat.completion`` shaped by the configured profile (``rewardq.judge_server.profiles``)
  after the configured latency, unless the profile refuses the request (its 400), a
  fault is injected or ``rpm_limit`` refuses it;
- ``GET /v1/models``: the configured model;
- ``GET /stats``: the counters (``rewardq.judge_server.stats``); ``POST /stats/reset`` zeroes them;
- ``GET /admin/config``: the knobs (``rewardq.judge_server.config``); ``POST`` changes any subset;
- ``GET /health``: ``{"status": "ok"}``.

The completion path is the hot one (thousands of requests per second on one core): no
validation library, one ``json.loads``/``json.dumps`` each way, O(1) bookkeeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import Mapping
from itertools import count
from typing import Any

from aiohttp import web

from rewardq.judge_server.config import ConfigValueError, JudgeConfig
from rewardq.judge_server.dispatch import grade_request, shown_responses
from rewardq.judge_server.faults import IMMEDIATE_FAULTS, FaultInjector
from rewardq.judge_server.grading import CORRECT_SCORE, INCORRECT_SCORE, user_text
from rewardq.judge_server.profiles import Refusal, Reply, answer, check_request
from rewardq.judge_server.protocol import (
    ERRORS,
    BadRequest,
    ErrorShape,
    chat_completion,
    error_body,
    models_list,
    parse_chat_request,
    prompt_tokens,
    retry_after_headers,
    score_spread,
)
from rewardq.judge_server.rate_limit import SlidingWindowLimiter
from rewardq.judge_server.stats import JudgeStats, PromptTally

#: Request bodies above this are refused (413): room for an item prompt whose response is
#: at rewardq's per-response limit (600k characters), prompt and reference besides.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Status recorded for an answer whose client hung up first (nginx's convention).
CLIENT_GONE = 499

SERVICE_KEY: web.AppKey[JudgeService] = web.AppKey("judge_service")


class JudgeService:
    """The judge's state and request handlers: current config, stats, faults, rate limit.

    Args:
        config: the knobs to start with; ``POST /admin/config`` replaces them later.
    """

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.stats = JudgeStats()
        self.faults = FaultInjector(config.seed)
        self.limiter = SlidingWindowLimiter()
        self._id_prefix = secrets.token_hex(4)
        self._ids = count(1)

    def reconfigure(self, changes: Mapping[str, Any]) -> JudgeConfig:
        """Apply ``changes`` (JSON field values) to the config and return the new config.

        Naming ``seed`` reseeds the fault/jitter generator (even to the same value), and
        naming ``rpm_limit`` starts a fresh rate-limit window.

        Raises:
            ConfigValueError: an unknown field or an invalid value; nothing changes.
        """
        config = self.config.updated(changes)
        if "seed" in changes:
            self.faults = FaultInjector(config.seed)
        if "rpm_limit" in changes:
            self.limiter.clear()
        self.config = config
        return config

    async def chat_completions(self, request: web.Request) -> web.Response:
        """``POST /v1/chat/completions``."""
        stats = self.stats
        stats.arrived()
        stats.started()
        try:
            return await self._complete(request)
        finally:
            stats.finished()

    async def _complete(self, request: web.Request) -> web.Response:
        config = self.config  # one snapshot per request: a reconfigure never tears it
        stats = self.stats
        try:
            chat = parse_chat_request(await request.read())
        except BadRequest as exc:
            return self._error(request, ERRORS["400"], str(exc))
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, ERRORS["413"])
        text = user_text(chat.messages)
        tally = stats.tally(text)
        stats.record(chat.model, text, chat.body)
        stats.shown(shown_responses(text))
        refusal = check_request(chat, config)
        if refusal is not None:
            return self._refuse(request, refusal)

        retry_after = self.limiter.admit(config.rpm_limit, time.monotonic())
        if retry_after is not None:
            stats.rpm_rejected()
            return self._error(request, ERRORS["rpm"], retry_after_s=retry_after)
        fault = self.faults.draw_fault(config)
        if fault is not None:
            stats.fault(fault)
            if fault in IMMEDIATE_FAULTS:
                return self._error(request, ERRORS[fault], retry_after_s=(
                    config.retry_after_s if fault == "429" else None))

        delay = config.timeout_sleep_s if fault == "timeout" else self.faults.latency_s(config)
        if delay > 0.0:
            await asyncio.sleep(delay)
        if fault in ERRORS:
            return self._error(request, ERRORS[fault])

        grade = None if fault == "malformed" else grade_request(chat.messages, config)
        offset = dict(config.model_offsets).get(chat.model) if config.model_offsets else None
        if grade is not None and offset and grade.reply is None:  # group replies: as graded
            grade = dataclasses.replace(
                grade, score=min(max(grade.score + offset, INCORRECT_SCORE), CORRECT_SCORE))
        spread = score_spread(config.seed, text) if chat.top_logprobs is not None else 0.0
        reply = answer(chat, grade, config, spread)
        return self._completion(request, chat.model, chat.messages, reply, tally,
                                scored=grade is not None and reply.complete)

    def _completion(self, request: web.Request, model: str, messages: list[Any],
                    reply: Reply, tally: PromptTally, *, scored: bool) -> web.Response:
        n_prompt = prompt_tokens(messages)
        request_id = f"chatcmpl-{self._id_prefix}{next(self._ids):010x}"
        body = chat_completion(request_id, model, reply.content, n_prompt,
                               reply.completion_tokens, reply.logprobs,
                               finish_reason=reply.finish_reason,
                               message_extra=reply.message_extra,
                               usage_extra=reply.usage_extra)
        if _client_gone(request):
            self.stats.answered(CLIENT_GONE)
        else:
            self.stats.answered(200)
            self.stats.judged(tally, n_prompt, reply.completion_tokens, scored=scored,
                              reasoning_tokens=reply.reasoning_tokens,
                              finish_reason=reply.finish_reason)
        return _json_response(body)

    def _refuse(self, request: web.Request, refusal: Refusal) -> web.Response:
        self.stats.answered(CLIENT_GONE if _client_gone(request) else refusal.status)
        return _json_response(refusal.body(), status=refusal.status)

    def _error(self, request: web.Request, shape: ErrorShape, message: str | None = None,
               retry_after_s: float | None = None) -> web.Response:
        self.stats.answered(CLIENT_GONE if _client_gone(request) else shape.status)
        headers = retry_after_headers(retry_after_s) if retry_after_s is not None else None
        return _json_response(error_body(shape, message), status=shape.status, headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``."""
        return _json_response(models_list(self.config.model))

    async def get_stats(self, request: web.Request) -> web.Response:
        """``GET /stats``."""
        return _json_response(self.stats.snapshot())

    async def get_requests(self, request: web.Request) -> web.Response:
        """``GET /requests``: the latest requests seen (see ``JudgeStats.record``)."""
        return _json_response(list(self.stats.recent))

    async def reset_stats(self, request: web.Request) -> web.Response:
        """``POST /stats/reset``: zero the counters, answer the (zeroed) snapshot."""
        self.stats.reset()
        return _json_response(self.stats.snapshot())

    async def get_config(self, request: web.Request) -> web.Response:
        """``GET /admin/config``."""
        return _json_response(self.config.as_dict())

    async def post_config(self, request: web.Request) -> web.Response:
        """``POST /admin/config`` with a JSON object of knobs to change."""
        try:
            changes = json.loads(await request.read() or b"{}")
            if not isinstance(changes, dict):
                raise ConfigValueError("the body must be a JSON object of config fields")
            config = self.reconfigure(changes)
        except (ValueError, TypeError) as exc:  # ConfigValueError, bad JSON
            return _json_response({"error": str(exc)}, status=400)
        return _json_response(config.as_dict())

    async def health(self, request: web.Request) -> web.Response:
        """``GET /health``."""
        return _json_response({"status": "ok"})


def build_app(config: JudgeConfig | None = None) -> web.Application:
    """The judge as an aiohttp application, its :class:`JudgeService` at ``app[SERVICE_KEY]``.

    Args:
        config: the knobs to start with; defaults to ``JudgeConfig()``.
    """
    service = JudgeService(config or JudgeConfig())
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[SERVICE_KEY] = service
    app.router.add_post("/v1/chat/completions", service.chat_completions)
    app.router.add_get("/v1/models", service.models)
    app.router.add_get("/stats", service.get_stats)
    app.router.add_post("/stats/reset", service.reset_stats)
    app.router.add_get("/requests", service.get_requests)
    app.router.add_get("/admin/config", service.get_config)
    app.router.add_post("/admin/config", service.post_config)
    app.router.add_get("/health", service.health)
    return app


# Payloads are built here from plain dicts: no cycles to check, no spaces to send.
_encode_json = json.JSONEncoder(check_circular=False, separators=(",", ":")).encode


def _json_response(payload: Any, status: int = 200,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode_json(payload).encode(), status=status, headers=headers,
                        content_type="application/json")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()

