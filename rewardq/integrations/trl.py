"""TRL: rewardq as a reward function (``GRPOTrainer(reward_funcs=[...])``).

TRL calls ``reward(prompts=..., completions=..., **columns)`` with one entry per
completion (each prompt repeated ``num_generations`` times), every other dataset column
as a keyword list aligned with them, plus its own extras (``trainer_state``,
``completion_ids``, ...). Prompts and completions are strings (standard format) or lists
of ``{"role", "content"}`` messages (conversational format). The function returns one
float per completion, in order: the judge's score normalized to [0, 1], or ``None``
wherever the result is not ``ok`` (the judge failed or timed out, the budget was spent,
the item is invalid, or the completion has no final answer to judge: empty, or its
thinking cut at the length limit): TRL turns ``None`` into NaN, "no reward from this
function", rather than a silent 0. Such a completion fails alone; the call never raises
for one. Identical completions of a call are judged once (the fleet dedups them by
fingerprint; the sync variant asks its judge once per distinct fingerprint).

Where TRL passes its ``log_metric(name, value)`` hook (``GRPOTrainer`` and
``RLOOTrainer`` do, on every call), each call also reports how many of its items ended
in each status, as ``rewardq/<function name>/<status>`` for every ``ResultStatus``
(``ok``, ``failed``, ``timeout``, ``invalid``, ``budget_exceeded``, ``no_answer``). TRL
averages a metric over the calls of a logging step (and over processes), so the logged
value is the mean count per reward call; every status is reported every call, zeros
included, so that mean is not biased. Without the hook (a custom loop, another trainer)
nothing is reported.

Three variants, one item-building and one result-reading path; each has a default
``__name__`` of its own, because TRL names a function's reward column and metrics after
it (two functions of one name would be averaged into one ``rewards/<name>/mean`` and
mix up the completions table):

- :func:`make_trl_reward` (``rewardq_judge``): through the worker fleet, blocking until
  the scores are in;
- :func:`make_async_trl_reward` (``rewardq_judge_async``): the same as a coroutine
  function, for TRL's async reward functions (the blocking Redis work runs in a thread);
- :func:`make_sync_trl_reward` (``rewardq_judge_sync``): the in-process ``SyncJudge``
  loop, no Redis.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.integrations.judging import score_each_once, without_invalid
from rewardq.judge.conversation import conversation_text
from rewardq.producer.client import RewardClient
from rewardq.producer.sync_judge import SyncJudge

__all__ = [
    "ASYNC_DEFAULT_NAME",
    "DEFAULT_NAME",
    "METRIC_PREFIX",
    "SYNC_DEFAULT_NAME",
    "AsyncTrlReward",
    "TrlReward",
    "make_async_trl_reward",
    "make_sync_trl_reward",
    "make_trl_reward",
    "merge_results",
    "metric_name",
    "report_statuses",
    "score_list",
    "trl_items",
]

#: ``reward(prompts, completions, **kwargs) -> one float or None per completion``.
TrlReward = Callable[..., list[float | None]]
#: The coroutine-function form of :data:`TrlReward`.
AsyncTrlReward = Callable[..., Awaitable[list[float | None]]]

#: Default ``__name__`` of :func:`make_trl_reward`'s function.
DEFAULT_NAME = "rewardq_judge"
#: Default ``__name__`` of :func:`make_async_trl_reward`'s function.
ASYNC_DEFAULT_NAME = "rewardq_judge_async"
#: Default ``__name__`` of :func:`make_sync_trl_reward`'s function.
SYNC_DEFAULT_NAME = "rewardq_judge_sync"
#: First part of every metric the adapters log through TRL.
METRIC_PREFIX = "rewardq"
DEFAULT_TIMEOUT_S = 600.0


def trl_items(prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Any],
              *, reference_key: str | None) -> tuple[list[ScoreItem], list[ScoreResult | None]]:
    """The judge items of one TRL call, and ``invalid`` results for what cannot be one.

    Args:
        prompts: one prompt per completion (string or conversation).
        completions: the completions (string or conversation).
        columns: TRL's keyword arguments; ``columns[reference_key]`` (a list aligned
            with the completions), if present, holds the reference answers.
        reference_key: the dataset column with the reference answer; ``None``: none.

    Returns:
        ``(items, results)``: the valid items (id = position), and a list as long as
        ``completions`` holding an ``invalid`` result at each position that is no valid
        item (an empty prompt, a text over ``rewardq.broker.schemas.MAX_TEXT_CHARS``) and
        ``None`` elsewhere. Empty and long completions are items: the judge is shown
        their view, and one with no final answer gets ``no_answer``.

    Raises:
        ValueError: ``prompts`` or the reference column is not as long as ``completions``.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions: TRL passes one each")
    references: Sequence[Any] = [None] * n
    if reference_key is not None and columns.get(reference_key) is not None:
        references = columns[reference_key]
        if len(references) != n:
            raise ValueError(f"column {reference_key!r} has {len(references)} entries for "
                             f"{n} completions")
    items: list[ScoreItem] = []
    results: list[ScoreResult | None] = [None] * n
    for i, (prompt, completion, reference) in enumerate(zip(prompts, completions, references,
                                                            strict=True)):
        try:
            items.append(ScoreItem(id=str(i), prompt=conversation_text(prompt),
                                   response=conversation_text(completion),
                                   reference=None if reference is None else str(reference)))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors())
            results[i] = ScoreResult.failure(str(i), ResultStatus.INVALID,
                                             f"not a valid judge item: {problems}")
    return items, results


def merge_results(results: Sequence[ScoreResult | None], judged: Sequence[ScoreResult]
                  ) -> list[ScoreResult | None]:
    """Judge results put into ``results`` by id (their position).

    Args:
        results: from :func:`trl_items` (``invalid`` entries, ``None`` elsewhere).
        judged: the judge's results for the valid items, ids being positions.

    Returns:
        A copy of ``results`` with each judged result at its position.
    """
    merged = list(results)
    for result in judged:
        merged[int(result.id)] = result
    return merged


def score_list(results: Sequence[ScoreResult | None], judged: Sequence[ScoreResult]
               ) -> list[float | None]:
    """Merge judge results into ``results`` by id and read one score (or ``None``) each.

    Args:
        results: from :func:`trl_items` (``invalid`` entries, ``None`` elsewhere).
        judged: the judge's results for the valid items, ids being positions.

    Returns:
        The normalized score of each ``ok`` result, ``None`` for every other position.
    """
    return _scores(merge_results(results, judged))


def _scores(merged: Sequence[ScoreResult | None]) -> list[float | None]:
    return [r.score if r is not None and r.status is ResultStatus.OK else None for r in merged]


def metric_name(function_name: str, status: ResultStatus) -> str:
    """The TRL metric counting one status: ``rewardq/<function_name>/<status>``."""
    return f"{METRIC_PREFIX}/{function_name}/{status.value}"


def report_statuses(columns: Mapping[str, Any], function_name: str,
                    results: Sequence[ScoreResult | None]) -> None:
    """Log how many ``results`` ended in each status, through TRL's hook if it was passed.

    Args:
        columns: the reward function's keyword arguments; ``columns["log_metric"]``, if
            callable, is TRL's ``log_metric(name, value)``; without it nothing happens.
        function_name: the reward function's ``__name__`` (part of each metric name).
        results: one result per completion (a position without one counts nowhere).
    """
    log_metric = columns.get("log_metric")
    if not callable(log_metric):
        return
    counts = Counter(r.status for r in results if r is not None)
    for status in ResultStatus:  # zeros too: TRL averages over the calls that logged
        log_metric(metric_name(function_name, status), float(counts[status]))


def _finish(columns: Mapping[str, Any], function_name: str,
            results: Sequence[ScoreResult | None], judged: Sequence[ScoreResult]
            ) -> list[float | None]:
    merged = merge_results(results, judged)
    report_statuses(columns, function_name, merged)
    return _scores(merged)


def _step(columns: Mapping[str, Any]) -> int | None:
    step = getattr(columns.get("trainer_state"), "global_step", None)
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _client(client_or_settings: RewardClient | Settings) -> RewardClient:
    client = RewardClient(client_or_settings) if isinstance(client_or_settings, Settings) \
        else client_or_settings
    if client.spec.group is not None:
        raise ConfigError(
            "group judging (REWARDQ_JUDGE_GROUP_MODE) needs each completion's GRPO group id, "
            "which TRL does not give its reward functions: unset REWARDQ_JUDGE_GROUP_MODE "
            "for the TRL reward functions (verl's reward loop and /v1/score items carry it)")
    return client


def make_trl_reward(client_or_settings: RewardClient | Settings, *,
                    reference_key: str | None = "solution",
                    timeout_s: float = DEFAULT_TIMEOUT_S,
                    name: str = DEFAULT_NAME) -> TrlReward:
    """A TRL reward function that scores through the worker fleet and waits.

    Args:
        client_or_settings: a ``RewardClient``, or ``Settings`` to build one from.
        reference_key: dataset column with the reference answer (correctness rubric);
            rows without it, or ``None``, are judged with the quality rubric.
        timeout_s: how long one call waits for the fleet; items still pending then
            get ``None``.
        name: the function's ``__name__``: TRL logs the reward as
            ``rewards/<name>/mean``, and the status counts go to ``rewardq/<name>/...``
            (read at each call, so renaming the function later renames them too).

    Returns:
        ``reward(prompts, completions, **kwargs) -> list[float | None]``; with a
        callable ``log_metric`` keyword it also reports the call's status counts
        (see :func:`report_statuses`).

    Raises:
        ConfigError: the settings ask for group judging, which needs group ids TRL does
            not pass.
        (from the returned function) BrokerUnavailableError: Redis could not be reached;
        ValueError: prompts or references not aligned with the completions.
    """
    client = _client(client_or_settings)

    def reward(prompts: Sequence[Any], completions: Sequence[Any],
               **kwargs: Any) -> list[float | None]:
        items, results = trl_items(prompts, completions, kwargs, reference_key=reference_key)
        items = without_invalid(client.rubrics, items, results) if items else items
        judged: list[ScoreResult] = []
        if items:
            pending = client.submit(items, step=_step(kwargs))
            judged = pending.result(timeout=timeout_s, partial=True)
        return _finish(kwargs, reward.__name__, results, judged)

    reward.__name__ = reward.__qualname__ = name
    return reward


def make_async_trl_reward(client_or_settings: RewardClient | Settings, *,
                          reference_key: str | None = "solution",
                          timeout_s: float = DEFAULT_TIMEOUT_S,
                          name: str = ASYNC_DEFAULT_NAME) -> AsyncTrlReward:
    """:func:`make_trl_reward` as a coroutine function (TRL's async reward functions).

    Submitting and waiting are blocking Redis calls; both run in a worker thread
    (``asyncio.to_thread``), so the event loop keeps serving other reward functions.
    Arguments, return value, status metrics and errors as for :func:`make_trl_reward`;
    only the default ``name`` differs, so both kinds can train side by side.
    """
    client = _client(client_or_settings)

    async def reward(prompts: Sequence[Any], completions: Sequence[Any],
                     **kwargs: Any) -> list[float | None]:
        items, results = trl_items(prompts, completions, kwargs, reference_key=reference_key)
        items = without_invalid(client.rubrics, items, results) if items else items
        judged: list[ScoreResult] = []
        if items:
            pending = await asyncio.to_thread(client.submit, items, step=_step(kwargs))
            judged = await asyncio.to_thread(pending.result, timeout_s, partial=True)
        return _finish(kwargs, reward.__name__, results, judged)

    reward.__name__ = reward.__qualname__ = name
    return reward


def make_sync_trl_reward(judge_or_settings: SyncJudge | Settings, *,
                         reference_key: str | None = "solution",
                         name: str = SYNC_DEFAULT_NAME) -> TrlReward:
    """A TRL reward function that judges in-process, one call per distinct completion at a
    time (no Redis).

    Args:
        judge_or_settings: a ``SyncJudge``, or ``Settings`` to build one from.
        reference_key: as for :func:`make_trl_reward`.
        name: the function's ``__name__``, as for :func:`make_trl_reward`.

    Returns:
        ``reward(prompts, completions, **kwargs) -> list[float | None]``; a failed judge
        call gives ``None`` at its position, never an exception. Status counts are
        reported through ``log_metric`` as for :func:`make_trl_reward`.

    Raises:
        (from the returned function) ValueError: prompts or references not aligned.
    """
    judge = (SyncJudge(judge_or_settings) if isinstance(judge_or_settings, Settings)
             else judge_or_settings)

    def reward(prompts: Sequence[Any], completions: Sequence[Any],
               **kwargs: Any) -> list[float | None]:
        items, results = trl_items(prompts, completions, kwargs, reference_key=reference_key)
        return _finish(kwargs, reward.__name__, results, score_each_once(judge, items))

    reward.__name__ = reward.__qualname__ = name
    return reward
