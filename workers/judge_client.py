"""The async judge client: a thin I/O shell around the pure prompts and verdict parser.

One ``JudgeClient`` per worker process, living on the process's asyncio loop, holding
one ``AsyncOpenAI`` client (and so one connection pool) reused across tasks. The SDK's
own retries are off (``max_retries=0``): ``workers.retry`` is the one layer that retries.
SDK errors become transient or permanent ``JudgeError`` s by ``broker.verdicts.classify``,
the one classification the sync judge shares.
"""

from __future__ import annotations

import asyncio

import openai

from broker.prompts import template_for
from broker.schemas import JudgeSpec, JudgeVerdict, ScoreItem, Usage
from broker.settings import Settings
from broker.verdicts import classify, extract_raw_score, normalize


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
