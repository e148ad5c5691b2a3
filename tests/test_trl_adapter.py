"""The TRL reward functions, called the way ``GRPOTrainer`` calls them.

TRL passes one prompt per completion (each prompt repeated ``num_generations`` times),
the dataset's other columns as aligned keyword lists, and extras of its own
(``completion_ids``, ``trainer_state``, ``log_extra``, ``log_metric``). Every expected
score comes from ``rewardq.judge_server.grading.expected_raw_score``, what the real local judge
answers. ``tests/test_trl_grpo.py`` drives the same functions inside a real trainer step.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import defaultdict
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from rewardq.broker.errors import ConfigError
from rewardq.broker.settings import Settings
from rewardq.integrations.trl import (
    ASYNC_DEFAULT_NAME,
    DEFAULT_NAME,
    SYNC_DEFAULT_NAME,
    make_async_trl_reward,
    make_sync_trl_reward,
    make_trl_reward,
)
from rewardq.judge.conversation import conversation_text
from rewardq.judge.verdicts import normalize
from rewardq.judge_server.grading import expected_raw_score
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.producer.sync_judge import SyncJudge
from rewardq.stack import JudgeProcess

QUESTIONS = [("What is 3 plus 4?", "7"), ("What is 12 times 3?", "36")]
COMPLETIONS = [
    "3 plus 4 is 7. The answer is 7.",
    "The answer is 8.",
    "",  # an empty completion has no answer to judge: None (no_answer)
    "12 times 3 = 36, so the answer is \\boxed{36}.",
    "Let me think.\nIt is 35.",
    "36",
]
GENERATIONS = 3


class MetricLog:
    """TRL's ``log_metric(name, value)`` keyword: ``GRPOTrainer._log_metric`` appends the
    value to ``_pending_metrics[name]``; this keeps them the same way."""

    def __init__(self) -> None:
        self.values: defaultdict[str, list[float]] = defaultdict(list)

    def __call__(self, name: str, value: float) -> None:
        self.values[name].append(value)

    def counts(self, function_name: str) -> dict[str, list[float]]:
        """The status metrics logged for one function, status -> values, one per call."""
        prefix = f"rewardq/{function_name}/"
        return {name.removeprefix(prefix): values for name, values in self.values.items()
                if name.startswith(prefix)}


def grpo_call(conversational: bool = False, *, with_solution: bool = True
              ) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """``(prompts, completions, kwargs)`` as GRPOTrainer passes them for one step."""
    prompts: list[Any] = [q for q, _ in QUESTIONS for _ in range(GENERATIONS)]
    completions: list[Any] = list(COMPLETIONS)
    if conversational:
        prompts = [[{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": p}] for p in prompts]
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    kwargs: dict[str, Any] = {
        "completion_ids": [[1, 2, 3]] * len(completions),
        "trainer_state": SimpleNamespace(global_step=3),
        "log_extra": lambda column, values: None,
    }
    if with_solution:
        kwargs["solution"] = [a for _, a in QUESTIONS for _ in range(GENERATIONS)]
    return prompts, completions, kwargs


def expected_scores(prompts: Sequence[Any], completions: Sequence[Any],
                    references: Sequence[str | None]) -> list[float | None]:
    return [normalize(expected_raw_score(conversation_text(p), conversation_text(c), r))
            if conversation_text(c) else None
            for p, c, r in zip(prompts, completions, references, strict=True)]



@pytest.mark.parametrize("conversational", [False, True])
def test_sync_reward_one_score_per_completion_in_order(
        local_judge: BackgroundJudgeServer, conversational: bool) -> None:
    reward = make_sync_trl_reward(Settings(judge_base_url=local_judge.base_url))
    prompts, completions, kwargs = grpo_call(conversational)
    scores = reward(prompts=prompts, completions=completions, **kwargs)
    assert scores == expected_scores(prompts, completions, kwargs["solution"])
    assert scores[2] is None
    assert scores[0] == 1.0 and scores[1] == 0.0  # correctness rubric: right, wrong
    assert reward.__name__ == "rewardq_judge_sync"


def test_sync_reward_without_reference_uses_the_quality_rubric(
        local_judge: BackgroundJudgeServer) -> None:
    with SyncJudge(Settings(judge_base_url=local_judge.base_url)) as judge:
        reward = make_sync_trl_reward(judge, reference_key="answer", name="judge_quality")
        prompts, completions, kwargs = grpo_call(with_solution=True)  # "solution" is ignored
        scores = reward(prompts, completions, **kwargs)
    assert scores == expected_scores(prompts, completions, [None] * len(completions))
    assert {s for s in scores if s is not None} - {0.0, 1.0}, "quality scores lie in between"
    assert reward.__name__ == "judge_quality"


def test_failed_judge_items_are_none(failing_judge: BackgroundJudgeServer) -> None:
    reward = make_sync_trl_reward(Settings(judge_base_url=failing_judge.base_url))
    prompts, completions, kwargs = grpo_call()
    assert reward(prompts, completions, **kwargs) == [None] * len(completions)


def test_status_counts_go_to_log_metric_once_per_call(
        local_judge: BackgroundJudgeServer, failing_judge: BackgroundJudgeServer) -> None:
    """Every status, zeros included, one value per call, under the function's name."""
    log = MetricLog()
    good = make_sync_trl_reward(Settings(judge_base_url=local_judge.base_url))
    bad = make_sync_trl_reward(Settings(judge_base_url=failing_judge.base_url), name="bad")
    prompts, completions, kwargs = grpo_call()
    good(prompts, completions, log_metric=log, **kwargs)
    good(prompts, completions[:2] + [""] * 4, log_metric=log, **kwargs)
    bad(prompts, completions, log_metric=log, **kwargs)
    assert log.counts("rewardq_judge_sync") == {
        "ok": [5.0, 2.0], "failed": [0.0, 0.0], "timeout": [0.0, 0.0], "invalid": [0.0, 0.0],
        "budget_exceeded": [0.0, 0.0], "no_answer": [1.0, 4.0]}
    assert log.counts("bad") == {"ok": [0.0], "failed": [5.0], "timeout": [0.0],
                                 "invalid": [0.0], "budget_exceeded": [0.0],
                                 "no_answer": [1.0]}
    assert len(log.values) == 12


def test_metrics_follow_a_later_rename(local_judge: BackgroundJudgeServer) -> None:
    log = MetricLog()
    reward = make_sync_trl_reward(Settings(judge_base_url=local_judge.base_url))
    reward.__name__ = "renamed"
    prompts, completions, kwargs = grpo_call()
    reward(prompts, completions, log_metric=log, **kwargs)
    assert log.counts("renamed")["ok"] == [5.0]
    assert not log.counts(SYNC_DEFAULT_NAME)


def test_default_names_differ_per_kind(settings: Settings) -> None:
    """TRL keys reward columns and metrics by ``__name__``: equal names would collide."""
    kinds = [make_trl_reward(settings), make_async_trl_reward(settings),
             make_sync_trl_reward(settings)]
    assert [f.__name__ for f in kinds] == [DEFAULT_NAME, ASYNC_DEFAULT_NAME, SYNC_DEFAULT_NAME]
    assert len({DEFAULT_NAME, ASYNC_DEFAULT_NAME, SYNC_DEFAULT_NAME}) == 3
    assert make_async_trl_reward(settings, name="mine").__name__ == "mine"


def test_misaligned_columns_are_a_clear_error(local_judge: BackgroundJudgeServer) -> None:
    reward = make_sync_trl_reward(Settings(judge_base_url=local_judge.base_url))
    prompts, completions, kwargs = grpo_call()
    with pytest.raises(ValueError, match="prompts"):
        reward(prompts[:-1], completions, **kwargs)
    with pytest.raises(ValueError, match="solution"):
        reward(prompts, completions, solution=kwargs["solution"][:2])


def test_fleet_rewards_blocking_and_async(settings: Settings, workers: Any) -> None:
    """Through Redis and worker processes: the same scores, from both fleet variants."""
    workers(n=1)
    log = MetricLog()
    prompts, completions, kwargs = grpo_call(conversational=True)
    expected = expected_scores(prompts, completions, kwargs["solution"])
    blocking = make_trl_reward(settings, timeout_s=60)
    assert blocking(prompts, completions, log_metric=log, **kwargs) == expected
    async_reward = make_async_trl_reward(settings, timeout_s=60)
    assert inspect.iscoroutinefunction(async_reward)
    fresh = [c + [{"role": "assistant", "content": " Done."}] if c[0]["content"] else c
             for c in completions]  # not in the fleet's cache yet
    assert asyncio.run(async_reward(prompts, fresh, log_metric=log, **kwargs)
                       ) == expected_scores(prompts, fresh, kwargs["solution"])
    ok_and_one_no_answer = {"ok": [5.0], "failed": [0.0], "timeout": [0.0], "invalid": [0.0],
                            "budget_exceeded": [0.0], "no_answer": [1.0]}
    assert log.counts("rewardq_judge") == ok_and_one_no_answer
    assert log.counts("rewardq_judge_async") == ok_and_one_no_answer


def reasoning_completions() -> tuple[list[str], list[str], list[str | None]]:
    """``(completions, solutions, outcomes)``: rollouts as policies write them (a short
    answer, an empty one, 110k characters with a long thinking block, one cut inside its
    thinking, one ending in ``<|im_end|>``, a 200k-character answer) and a copy of the
    short answer, which must share its judge call."""
    thinking = "Let me think step by step. First we add the two numbers. " * 1950
    completions = [
        "The answer is 5.",
        "",
        f"<think>{thinking}</think>Adding them gives 5. The answer is 5.",
        "<think>Hmm, wait. " + "So the result is it. " * 300,
        "Then we compute the sum: the answer is 5.<|im_end|>",
        "We compute the sum of 2 and 3. " * 6500 + "So the final answer is 5.",
        "The answer is 5.",
    ]
    outcomes: list[str | None] = ["ok", "no_answer", "ok", "no_answer", "ok", "ok", "ok"]
    return completions, ["5"] * len(completions), outcomes


@pytest.mark.parametrize("kind", ["fleet", "fleet_async", "sync"])
def test_rollouts_as_policies_write_them_in_one_call(
        settings: Settings, workers: Any, judge: JudgeProcess, kind: str) -> None:
    """TRL's reward-function path with every kind of rollout in one call: it returns
    a score for each answer and ``None`` for the two without one (``no_answer``), the
    judge never sees thinking or end-of-turn tokens, and identical completions are
    judged once."""
    completions, solutions, outcomes = reasoning_completions()
    assert len(completions[2]) > 110_000 and len(completions[5]) > 200_000
    prompts = ["What is 2 plus 3?"] * len(completions)
    log = MetricLog()
    kwargs = {"solution": solutions, "trainer_state": SimpleNamespace(global_step=1),
              "log_metric": log}
    if kind == "sync":
        reward = make_sync_trl_reward(settings, name="judge")
        scores = reward(prompts, completions, **kwargs)
    else:
        workers(n=1)
        if kind == "fleet":
            reward = make_trl_reward(settings, timeout_s=60, name="judge")
            scores = reward(prompts, completions, **kwargs)
        else:
            async_reward = make_async_trl_reward(settings, timeout_s=60, name="judge")
            scores = asyncio.run(async_reward(prompts, completions, **kwargs))

    assert [s is not None for s in scores] == [o == "ok" for o in outcomes]
    assert all(0.0 <= s <= 1.0 for s in scores if s is not None)
    assert scores[0] == scores[6] == 1.0
    assert log.counts("judge") == {"ok": [5.0], "failed": [0.0], "timeout": [0.0],
                                   "invalid": [0.0], "budget_exceeded": [0.0],
                                   "no_answer": [2.0]}
    stats = judge.stats()
    assert stats["requests_total"] == 4, stats  # 5 answers, two of them identical
    assert stats["max_requests_per_prompt"] == 1, stats
    assert stats["requests_with_thinking"] == 0, stats
    assert stats["requests_with_end_of_turn"] == 0, stats
    assert stats["max_response_chars"] < 40_000, stats  # the 200k answer, capped


def test_group_judging_is_refused_at_once_with_the_reason(settings: Settings) -> None:
    """TRL gives its reward functions no group ids: rather than every completion coming
    back invalid (None) at each step, building the function says why."""
    grouped = settings.model_copy(update={"judge_group_mode": "listwise",
                                          "judge_group_size": GENERATIONS})
    for factory in (make_trl_reward, make_async_trl_reward):
        with pytest.raises(ConfigError, match="REWARDQ_JUDGE_GROUP_MODE"):
            factory(grouped)
    with pytest.raises(ConfigError, match="group judging"):
        make_sync_trl_reward(grouped)
