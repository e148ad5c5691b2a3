"""The judge call without its I/O: what to send, and what the reply means.

httpx's idea: the logic lives once, and thin shells drive it. The worker's async client,
the in-process sync judge and the benchmark's one-process baseline all build the same
chat-completions body from the same ``JudgeSpec`` and read the reply with the same
functions, so for the same judge answers every path gives the same score.

    spec = judge_spec(settings)                  # what changes the answer (and the cache key)
    body = judge_request(spec, item)             # POST {base_url}/chat/completions
    content, usage = read_reply(response_bytes)  # the first choice's text, token usage
    verdict = judge_verdict(content, usage)      # score in [0, 1], raw 1-10, usage
"""

from __future__ import annotations

import json
from typing import Any

from broker.errors import UnparseableReplyError
from broker.prompts import template_for
from broker.schemas import JudgeSpec, JudgeVerdict, ScoreItem, Usage
from broker.settings import Settings
from broker.verdicts import extract_raw_score, normalize

__all__ = ["COMPLETIONS_PATH", "judge_request", "judge_spec", "judge_verdict", "read_reply"]

#: Where the body is POSTed, relative to the OpenAI-compatible base URL.
COMPLETIONS_PATH = "/chat/completions"


def judge_spec(settings: Settings) -> JudgeSpec:
    """Everything in ``settings`` that changes the judge's answer: model, prompt version,
    temperature, max tokens. The producer puts it on every chunk and fingerprints items
    with it; the sync judge uses it too, so both can never key the cache differently."""
    return JudgeSpec(model=settings.judge_model, prompt_version=settings.judge_prompt_version,
                     temperature=settings.judge_temperature,
                     max_tokens=settings.judge_max_tokens)


def judge_request(spec: JudgeSpec, item: ScoreItem) -> dict[str, Any]:
    """The chat-completions request body asking the judge to score ``item``.

    Raises:
        ConfigError: ``spec.prompt_version`` names no known template.
    """
    return {"model": spec.model, "messages": template_for(spec.prompt_version).messages(item),
            "temperature": spec.temperature, "max_tokens": spec.max_tokens}


def read_reply(body: bytes | str) -> tuple[str | None, Usage | None]:
    """The first choice's message content and the token usage of a chat completion.

    Raises:
        UnparseableReplyError: the body is not a chat-completion JSON object.
    """
    try:
        reply: Any = json.loads(body)
        choices = reply.get("choices") or []
        content = choices[0]["message"].get("content") if choices else None
        usage = reply.get("usage")
        return content, (Usage(prompt_tokens=usage.get("prompt_tokens") or 0,
                               completion_tokens=usage.get("completion_tokens") or 0)
                         if usage else None)
    except (ValueError, TypeError, LookupError, AttributeError, RecursionError) as exc:
        raise UnparseableReplyError(f"judge reply is not a chat completion: {exc}") from exc


def judge_verdict(content: str | None, usage: Usage | None) -> JudgeVerdict:
    """The verdict in a reply's content: the score read, clamped and normalized.

    Raises:
        UnparseableReplyError: the content holds no readable score.
    """
    raw = extract_raw_score(content)
    return JudgeVerdict(score=normalize(raw), raw_score=raw, usage=usage or Usage())
