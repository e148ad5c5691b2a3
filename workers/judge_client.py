"""The async judge client: a thin I/O shell around the pure prompts and verdict parser.

One ``JudgeClient`` per worker process, living on the process's asyncio loop, holding
one ``AsyncOpenAI`` client (and so one connection pool) reused across tasks. The SDK's
own retries are off (``max_retries=0``): ``workers.retry`` is the one layer that retries.
"""

from __future__ import annotations

import asyncio

import openai

from broker.errors import JudgeError, PermanentJudgeError, TransientJudgeError
from broker.prompts import template_for
from broker.schemas import JudgeSpec, JudgeVerdict, ScoreItem, Usage
from broker.settings import Settings
from broker.verdicts import extract_raw_score, normalize


class JudgeClient:
    """Calls an OpenAI-compatible chat-completions endpoint and reads a score back.

    Args:
        settings: endpoint, key, transport, timeout and per-process concurrency.
    """

    def __init__(self, settings: Settings) -> None:
        http_client = openai.DefaultAioHttpClient() if settings.judge_transport == "aiohttp" \
            else None
        self._client = openai.AsyncOpenAI(
            base_url=settings.judge_base_url,
            api_key=settings.judge_api_key.get_secret_value(),
            timeout=settings.judge_timeout_s,
            max_retries=0,
            http_client=http_client,
        )
        self._slots = asyncio.Semaphore(settings.max_concurrent_requests)

    async def judge(self, spec: JudgeSpec, item: ScoreItem) -> JudgeVerdict:
        """One judge call for ``item`` (no retries, no cache).

        Raises:
            TransientJudgeError: rate limit, timeout, 408/409/5xx or a network error.
            PermanentJudgeError: any other HTTP error.
            UnparseableReplyError: the reply holds no readable score.
        """
        messages = template_for(spec.prompt_version).messages(item)
        async with self._slots:
            try:
                reply = await self._client.chat.completions.create(
                    model=spec.model, messages=messages,  # type: ignore[arg-type]
                    temperature=spec.temperature, max_tokens=spec.max_tokens)
            except openai.APIError as exc:
                raise classify(exc) from exc
        content = reply.choices[0].message.content if reply.choices else None
        usage = Usage(prompt_tokens=reply.usage.prompt_tokens,
                      completion_tokens=reply.usage.completion_tokens) if reply.usage \
            else Usage()
        raw = extract_raw_score(content)
        return JudgeVerdict(score=normalize(raw), raw_score=raw, usage=usage)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.close()


def classify(exc: openai.APIError) -> JudgeError:
    """Map an SDK error to a transient or permanent ``JudgeError``.

    Transient: timeouts, connection errors, 408, 409, 429 and 5xx. Permanent: the rest.
    """
    if isinstance(exc, openai.APITimeoutError):
        return TransientJudgeError(f"judge timed out: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return TransientJudgeError(f"judge unreachable: {exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after_s(exc)
        message = f"judge answered HTTP {status}: {_short(exc)}"
        if status in (408, 409, 429) or status >= 500:
            return TransientJudgeError(message, status_code=status, retry_after_s=retry_after)
        return PermanentJudgeError(message, status_code=status)
    return PermanentJudgeError(f"judge error: {exc}")


def _retry_after_s(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


def _short(exc: openai.APIStatusError) -> str:
    return str(exc.message)[:200]
