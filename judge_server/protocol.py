"""The OpenAI chat-completions wire format, as far as the local judge speaks it; pure.

Request bodies are read leniently (any model, extra fields ignored) but a body the real
API would refuse (no ``messages`` list, ``stream: true``, ``n`` > 1) gets the same 400
shape the real API sends, so the ``openai`` SDK raises the same exception classes.
Token counts are a deterministic stand-in for a tokenizer: ``len(text) // 4 + 1``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from judge_server.grading import Grade, content_text

MALFORMED_REPLY = "I cannot grade this response."


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
    model = data.get("model")
    return ChatRequest(model if isinstance(model, str) and model else "unknown", messages)


def reply_content(grade: Grade) -> str:
    """The assistant message the judge sends: ``{"score": N, "reason": "..."}``."""
    return json.dumps({"score": grade.score, "reason": grade.reason})


def chat_completion(request_id: str, model: str, content: str, prompt_token_count: int,
                    completion_token_count: int) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice carrying ``content``."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_token_count,
            "completion_tokens": completion_token_count,
            "total_tokens": prompt_token_count + completion_token_count,
        },
        "system_fingerprint": "rewardq-local-judge",
    }


def error_body(shape: ErrorShape, message: str | None = None) -> dict[str, Any]:
    """The ``{"error": {...}}`` body of an API error."""
    return {"error": {"message": message or shape.message, "type": shape.type,
                      "param": None, "code": shape.code}}


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up, as HTTP requires) and the precise
    ``retry-after-ms``, which the ``openai`` SDK reads first."""
    return {"Retry-After": str(math.ceil(seconds)),
            "retry-after-ms": str(max(math.ceil(seconds * 1000.0), 0))}


def models_list(model: str) -> dict[str, Any]:
    """The ``GET /v1/models`` body listing ``model``."""
    return {"object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "rewardq"}]}
