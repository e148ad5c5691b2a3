"""``SyncJudge``: the in-process synchronous judge loop, for development and tests.

No Redis, no workers: one plain ``openai.OpenAI`` client and a loop over the items, one
call at a time. Simplicity is the point of this mode; throughput is the fleet's job.
It is a thin shell around the one judge core (``rewardq.judge.judge_core``): the same request
body from the same ``JudgeSpec`` and the same reply reading as the workers, so for the
same judge answers both modes give the same scores.

Retries are left to the SDK (``max_retries``, honouring ``Retry-After``); a result's
``attempts`` is 1 for every item that reached the judge, however many HTTP retries the
SDK made underneath. One item's failure never raises: it becomes a ``failed`` result.
The judge is shown the items' views (``rewardq.judge.rollout_view``), as the fleet's producer
shows them, and a parameter the endpoint refuses is learned once, as the workers do.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import httpx2
import openai
from pydantic import SecretStr

from rewardq.broker.errors import ConfigError, RewardqError
from rewardq.broker.schemas import JudgeVerdict, ResultStatus, ScoreItem, ScoreResult, parse_items
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import (
    COMPLETIONS_PATH,
    answer_text,
    judge_request,
    judge_spec,
    judge_verdict,
    read_reply,
)
from rewardq.judge.judge_request import LearnedRequests, reply_budget
from rewardq.judge.rollout_view import view_items
from rewardq.judge.rubrics import rubric_book
from rewardq.judge.verdicts import classify

__all__ = ["SyncJudge"]

#: Retries the SDK makes per call (408/409/429/5xx, timeouts, connection errors).
DEFAULT_MAX_RETRIES = 2


class SyncJudge:
    """Judges items one at a time with a synchronous OpenAI-compatible client.

    Args:
        settings: judge endpoint, model, prompt version, temperature and max tokens.
        api_key: overrides ``settings.judge_api_key`` (e.g. ``LengthPenaltyConfig.api_key``).
        base_url: overrides ``settings.judge_base_url``.
        timeout_s: timeout of one call; default ``settings.judge_timeout_s``.
        max_retries: retries the SDK makes per call.

    Raises:
        ConfigError: ``settings.judge_prompt_version`` names no known template, the
            rubrics file is bad, or the settings ask for an ensemble or group judging.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        timeout_s: float | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        key = api_key if api_key is not None else settings.judge_api_key
        self.settings = settings
        self.rubrics = rubric_book(settings)  # a bad file or version fails here, not per call
        self.spec = judge_spec(settings, self.rubrics)
        if self.spec.judges or self.spec.samples > 1 or self.spec.group is not None:
            raise ConfigError(
                "the in-process sync judge makes one call per item: ensembles "
                "(REWARDQ_JUDGE_ENSEMBLE, REWARDQ_JUDGE_SAMPLES) and group judging "
                "(REWARDQ_JUDGE_GROUP_MODE) need the worker fleet (use_async_io=True)")
        self.base_url = (base_url or settings.judge_base_url).rstrip("/")
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=key.get_secret_value() if isinstance(key, SecretStr) else key,
            timeout=timeout_s if timeout_s is not None else settings.judge_timeout_s,
            max_retries=max_retries,
        )
        self._learned = LearnedRequests()

    def judge(self, item: ScoreItem) -> JudgeVerdict:
        """One judge call for ``item`` (the SDK's retries included), no cache.

        Args:
            item: the pair to judge.

        Returns:
            The normalized score, the raw score as written, and the token usage.

        Raises:
            TransientJudgeError: timeout, network error, 408/409/429/5xx after the SDK's
                retries.
            PermanentJudgeError: any other HTTP error.
            UnparseableReplyError: the reply holds no readable score.
        """
        rubric = self.rubrics.rubric_for(self.spec, item)
        body = self._learned.adapt(judge_request(self.spec, rubric, item))
        while True:
            try:
                response = self._client.post(COMPLETIONS_PATH, cast_to=httpx2.Response,
                                             body=body)
                break
            except openai.APIError as exc:
                error = classify(exc)
                retry = self._learned.retry_body(body, error, self.base_url)
                if retry is None:
                    raise error from exc
                body = retry
        reply = read_reply(response.content)
        return judge_verdict(answer_text(reply, reply_budget(self.spec)), reply.usage,
                             reply.tokens, mode=rubric.score_mode_for(self.spec),
                             scale=rubric.scale)

    def score_one(self, item: ScoreItem) -> ScoreResult:
        """``item``'s result: ``ok`` with its score, or ``failed`` with the error; never raises
        for a judge failure.
        """
        started = time.perf_counter()
        viewed = view_items([item], self.spec, self.rubrics)[0]
        if isinstance(viewed, ScoreResult):
            return viewed
        try:
            verdict = self.judge(viewed)
        except (RewardqError, openai.OpenAIError, ValueError) as exc:
            # ValueError: a body the SDK could not decode; still this item's failure only.
            return ScoreResult.failure(
                item.id,
                ResultStatus.FAILED,
                str(exc) or type(exc).__name__,
                attempts=1,
                latency_ms=_ms_since(started),
            )
        return ScoreResult.from_verdict(
            item.id, verdict, cached=False, attempts=1, latency_ms=_ms_since(started)
        )

    def score(self, items: Iterable[ScoreItem | Mapping[str, Any]]) -> list[ScoreResult]:
        """One result per item, in order, judging one item at a time.

        Args:
            items: ``ScoreItem`` s or mappings with the item JSON fields.

        Returns:
            ``ok`` results with score, raw score, usage, ``attempts=1`` and latency, or
            ``failed`` results carrying the error.

        Raises:
            InvalidItemError: some item is invalid (checked before any call is made).
        """
        return [self.score_one(item) for item in self.rubrics.assign(parse_items(items))]

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()

    def __enter__(self) -> SyncJudge:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
