"""The OpenAI chat-completions wire format, as far as the local judge speaks it; pure.

Request bodies are read leniently (any model, extra fields ignored) but a body the real
API would refuse (no ``messages`` list, ``stream: true``, ``n`` > 1) gets the same 400
shape the real API sends, so the ``openai`` SDK raises the same exception classes.
Token counts are a deterministic stand-in for a tokenizer: ``len(text) // 4 + 1``.

Asked for ``logprobs``, the judge answers them in the OpenAI shape
(``choices[0].logprobs.content[i].top_logprobs``) over a stand-in tokenization of its
reply (:func:`reply_tokens`): every token is certain except the score's, whose
alternatives are a distribution over "1".."10" peaked at the grade
(:func:`score_logprobs`), with a spread drawn from the seed and the prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from rewardq.judge_server.grading import Grade, content_text

MALFORMED_REPLY = "I cannot grade this response."
#: The most ``top_logprobs`` the chat-completions API accepts.
MAX_TOP_LOGPROBS = 20
#: The judge's score scale, whose tokens get a distribution at the score's position.
SCALE = range(1, 11)
#: Bounds of the spread (a softmax temperature over |k - grade|) of the score tokens.
SPREAD_MIN, SPREAD_MAX = 0.4, 1.6
_TOKEN = re.compile(r"\d+|\w+|\s+|[^\w\s]+")


@dataclass(frozen=True)
class ErrorShape:
    """One kind of API error: its HTTP status and the body's ``type``/``code``/``message``."""

    status: int
    type: str
    code: str | None
    message: str


#: Injected faults (keyed by fault kind) and refusals (``"rpm"``, ``"413"``), worded like
#: the hosted API's.
ERRORS: dict[str, ErrorShape] = {
    "429": ErrorShape(429, "requests", "rate_limit_exceeded",
                      "Rate limit reached for requests (injected by the local judge)."),
    "rpm": ErrorShape(429, "requests", "rate_limit_exceeded",
                      "Rate limit reached: rpm_limit requests per minute."),
    "500": ErrorShape(500, "server_error", None,
                      "The server had an error while processing your request."),
    "503": ErrorShape(503, "server_error", "overloaded",
                      "The engine is currently overloaded, please try again later."),
    "400": ErrorShape(400, "invalid_request_error", None,
                      "Invalid request (injected by the local judge)."),
    "401": ErrorShape(401, "invalid_request_error", "invalid_api_key",
                      "Incorrect API key provided (injected by the local judge)."),
    "413": ErrorShape(413, "invalid_request_error", "request_too_large",
                      "The request body is too large."),
}


class BadRequest(ValueError):
    """A request body the chat-completions API would refuse with 400."""


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a chat-completions request the judge uses."""

    model: str
    messages: list[Any]
    #: ``top_logprobs`` asked for, or ``None`` when ``logprobs`` was not asked for.
    top_logprobs: int | None = None
    #: The whole request body (the profiles read the parameters they answer to).
    body: dict[str, Any] = field(default_factory=dict)


def count_tokens(text: str) -> int:
    """Deterministic token count of ``text``: ``len(text) // 4 + 1``."""
    return len(text) // 4 + 1


def prompt_tokens(messages: list[Any]) -> int:
    """Prompt tokens of a request: :func:`count_tokens` summed over its messages."""
    return sum(count_tokens(content_text(m.get("content")) if isinstance(m, dict) else "")
               for m in messages)


def parse_chat_request(body: bytes) -> ChatRequest:
    """Read a chat-completions request body.

    Raises:
        BadRequest: not a JSON object, no non-empty ``messages`` list, or asks for a
            feature the local judge lacks (streaming, several choices).
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array")
    if data.get("stream"):
        raise BadRequest("the local judge does not stream; send stream=false")
    if data.get("n", 1) not in (1, None):
        raise BadRequest("the local judge answers with one choice; send n=1")
    logprobs, top = data.get("logprobs"), data.get("top_logprobs")
    if logprobs not in (None, True, False):
        raise BadRequest("'logprobs' must be a boolean")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool)
                            or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise BadRequest(f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    if top is not None and not logprobs:
        raise BadRequest("'logprobs' must be true when 'top_logprobs' is set")
    model = data.get("model")
    return ChatRequest(model if isinstance(model, str) and model else "unknown", messages,
                       (top or 0) if logprobs else None, data)


def reply_content(grade: Grade) -> str:
    """The assistant message the judge sends: ``{"score": N, "reason": "..."}``."""
    return json.dumps({"score": grade.score, "reason": grade.reason})


def score_spread(seed: int, text: str) -> float:
    """The spread of the score's distribution for a prompt: in [SPREAD_MIN, SPREAD_MAX],
    fixed by ``seed`` and ``text`` (the same request always gets the same logprobs)."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return SPREAD_MIN + (SPREAD_MAX - SPREAD_MIN) * int.from_bytes(digest[:8], "big") / 2**64


def score_logprobs(grade: int, spread: float) -> dict[int, float]:
    """log p(k) for k in 1..10, p(k) proportional to exp(-|k - grade| / spread)."""
    weights = {k: -abs(k - grade) / spread for k in SCALE}
    log_total = math.log(math.fsum(math.exp(w) for w in weights.values()))
    return {k: w - log_total for k, w in weights.items()}


def reply_tokens(content: str) -> list[str]:
    """A stand-in tokenization of ``content``: digit runs, words, whitespace runs and
    punctuation runs, so the score's digits are one token (``"10"`` included)."""
    return _TOKEN.findall(content)


def logprobs_content(content: str, grade: int | None, spread: float,
                     top_logprobs: int) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content`` for ``content``: each token with logprob 0 and
    itself as its one alternative, except the first scale-valued digits after ``"score"``
    (where ``grade`` was written), whose alternatives are :func:`score_logprobs`, most
    likely first, ``top_logprobs`` of them."""
    tokens = reply_tokens(content)
    start = content.find('"score"')
    score_at = None
    if grade is not None and start >= 0:
        offset = 0
        for i, token in enumerate(tokens):
            if offset > start and token == str(grade):
                score_at = i
                break
            offset += len(token)
    entries = []
    for i, token in enumerate(tokens):
        if i == score_at and grade is not None:
            ranked = sorted(score_logprobs(grade, spread).items(), key=lambda kv: -kv[1])
            logprob = dict(ranked)[grade]
            top = [_token_entry(str(k), lp) for k, lp in ranked[:top_logprobs]]
        else:
            logprob, top = 0.0, [_token_entry(token, 0.0)][:top_logprobs]
        entries.append({**_token_entry(token, logprob), "top_logprobs": top})
    return entries


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_completion(request_id: str, model: str, content: str | None, prompt_token_count: int,
                    completion_token_count: int,
                    logprobs: list[dict[str, Any]] | None = None, *,
                    finish_reason: str = "stop",
                    message_extra: dict[str, Any] | None = None,
                    usage_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice carrying ``content`` (and the
    per-token ``logprobs``, when given).

    ``message_extra`` adds fields to the message (e.g. ``reasoning_content``),
    ``usage_extra`` to the usage (e.g. ``completion_tokens_details``).
    """
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if message_extra:
        message.update(message_extra)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_token_count,
        "completion_tokens": completion_token_count,
        "total_tokens": prompt_token_count + completion_token_count,
    }
    if usage_extra:
        usage.update(usage_extra)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason,
        }],
        "usage": usage,
        "system_fingerprint": "rewardq-local-judge",
    }


def error_body(shape: ErrorShape, message: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The ``{"error": {...}}`` body of an API error."""
    return {"error": {"message": message or shape.message, "type": shape.type,
                      "param": param, "code": shape.code}}


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up, as HTTP requires) and the precise
    ``retry-after-ms``, which the ``openai`` SDK reads first."""
    return {"Retry-After": str(math.ceil(seconds)),
            "retry-after-ms": str(max(math.ceil(seconds * 1000.0), 0))}


def models_list(model: str) -> dict[str, Any]:
    """The ``GET /v1/models`` body listing ``model``."""
    return {"object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "rewardq"}]}
