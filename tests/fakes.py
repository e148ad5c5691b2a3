"""Fakes of rewardq's own interfaces, for tests that start no process and open no socket.

``InMemoryJudge`` plays one or more OpenAI-compatible judge endpoints behind the
``rewardq.workers.judge_client.JudgeTransport`` protocol: hand its :meth:`transport` to
``JudgeClient(settings, transport_factory=...)`` and every call the client makes (after its
rate limiter, budget, endpoint routing and parameter learning) lands in
``InMemoryJudge.requests`` and is answered by the judge's ``respond`` function. An error
answer becomes the same ``JudgeError`` the HTTP transport raises for it (built by
``rewardq.judge.verdicts``), so what the client does with it is what it does over HTTP.

    judge = InMemoryJudge(lambda url, body: completion("Score: 7"))
    client = JudgeClient(settings, transport_factory=judge.transport)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rewardq.broker.errors import JudgeError
from rewardq.broker.settings import Settings
from rewardq.judge.verdicts import http_error, network_error, refused_param, status_detail

__all__ = ["Answer", "InMemoryJudge", "InMemoryTransport", "Request", "Respond", "completion",
           "error_answer", "unreachable"]


@dataclass(frozen=True)
class Answer:
    """One HTTP answer of a judge endpoint."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One chat-completions POST as it would go on the wire."""

    base_url: str
    body: dict[str, Any]


#: ``respond(base_url, body)``: the endpoint's answer to a request, or the ``JudgeError``
#: its transport raises (no answer at all: :func:`unreachable`).
Respond = Callable[[str, dict[str, Any]], Answer | JudgeError]


def completion(content: str | None, *, finish_reason: str = "stop", prompt_tokens: int = 120,
               completion_tokens: int = 8, reasoning_tokens: int | None = None,
               reasoning_content: str | None = None,
               logprobs: list[dict[str, Any]] | None = None) -> Answer:
    """A 200 chat completion whose first choice says ``content``.

    Args:
        content: the message content (thinking included, when the judge writes it there).
        finish_reason: why the reply ended (``length``: cut by its token limit).
        prompt_tokens, completion_tokens: the usage billed.
        reasoning_tokens: ``usage.completion_tokens_details.reasoning_tokens``, when set.
        reasoning_content: the thinking in a field of its own, as DeepSeek and vLLM send it.
        logprobs: ``choices[0].logprobs.content`` entries (``token``, ``logprob``,
            ``top_logprobs``).
    """
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    reply = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
             "model": "fake", "choices": [choice], "usage": usage}
    return Answer(200, json.dumps(reply).encode())


def error_answer(status: int, message: str, *, code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> Answer:
    """An error answer in OpenAI's shape: ``{"error": {"message", "code", "param"}}``."""
    error = {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    return Answer(status, json.dumps({"error": error}).encode(), dict(headers or {}))


def unreachable(base_url: str) -> JudgeError:
    """What a transport raises when nothing answers at ``base_url``."""
    return network_error(f"ClientConnectorError: cannot connect to {base_url}")


def _verdict(base_url: str, body: dict[str, Any]) -> Answer:
    return completion("Score: 7")


class InMemoryJudge:
    """Judge endpoints in memory: every POST recorded, each answered by ``respond``.

    Args:
        respond: the answer to each request (default: ``Score: 7`` from every endpoint).
    """

    def __init__(self, respond: Respond = _verdict) -> None:
        self.respond = respond
        self.requests: list[Request] = []
        self.transports: list[InMemoryTransport] = []

    def transport(self, settings: Settings, base_url: str) -> InMemoryTransport:
        """The transport of endpoint ``base_url``: a ``JudgeClient`` transport factory."""
        transport = InMemoryTransport(self, base_url)
        self.transports.append(transport)
        return transport

    def bodies(self, base_url: str | None = None) -> list[dict[str, Any]]:
        """The bodies received, in order (those of ``base_url`` alone, when given)."""
        return [r.body for r in self.requests if base_url is None or r.base_url == base_url]


class InMemoryTransport:
    """One endpoint of an :class:`InMemoryJudge` (a ``JudgeTransport``)."""

    def __init__(self, judge: InMemoryJudge, base_url: str) -> None:
        self._judge = judge
        self.base_url = base_url
        self.closed = False

    async def post(self, body: dict[str, Any]) -> bytes:
        """The body of a 2xx answer; an error answer raised as the HTTP transport does."""
        # What goes on the wire: JSON, NaN refused, and no later change of the caller's dict.
        sent = json.loads(json.dumps(body, allow_nan=False))
        self._judge.requests.append(Request(self.base_url, sent))
        answer = self._judge.respond(self.base_url, sent)
        if isinstance(answer, JudgeError):
            raise answer
        if answer.status >= 400:
            raise http_error(answer.status, answer.headers,
                             status_detail(answer.status, answer.body),
                             param=refused_param(answer.status, answer.body))
        return answer.body

    async def close(self) -> None:
        """Nothing to close; remembered."""
        self.closed = True
