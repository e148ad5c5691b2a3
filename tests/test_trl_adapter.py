"""The TRL reward functions, called the way ``GRPOTrainer`` calls them.

TRL passes one prompt per completion (each prompt repeated ``num_generations`` times),
the dataset's other columns as aligned keyword lists, and extras of its own
(``completion_ids``, ``trainer_state``). Every expected score comes from
``judge_server.grading.expected_raw_score``, what the real local judge answers.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from broker.settings import Settings
from broker.verdicts import normalize
from judge_server.grading import expected_raw_score
from judge_server.server import BackgroundJudgeServer
from producer.sync_judge import SyncJudge
from producer.trl import (
    make_async_trl_reward,
    make_sync_trl_reward,
    make_trl_reward,
    message_text,
)

QUESTIONS = [("What is 3 plus 4?", "7"), ("What is 12 times 3?", "36")]
COMPLETIONS = [
    "3 plus 4 is 7. The answer is 7.",
    "The answer is 8.",
    "",  # an empty completion is no judge item: None
    "12 times 3 = 36, so the answer is \\boxed{36}.",
    "Let me think.\nIt is 35.",
    "36",
]
GENERATIONS = 3


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
    }
    if with_solution:
        kwargs["solution"] = [a for _, a in QUESTIONS for _ in range(GENERATIONS)]
    return prompts, completions, kwargs


def expected_scores(prompts: Sequence[Any], completions: Sequence[Any],
                    references: Sequence[str | None]) -> list[float | None]:
    return [normalize(expected_raw_score(message_text(p), message_text(c), r))
            if message_text(c) else None
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
    assert reward.__name__ == "rewardq_judge"


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


def test_misaligned_columns_are_a_clear_error(local_judge: BackgroundJudgeServer) -> None:
    reward = make_sync_trl_reward(Settings(judge_base_url=local_judge.base_url))
    prompts, completions, kwargs = grpo_call()
    with pytest.raises(ValueError, match="prompts"):
        reward(prompts[:-1], completions, **kwargs)
    with pytest.raises(ValueError, match="solution"):
        reward(prompts, completions, solution=kwargs["solution"][:2])


def test_message_text_reads_both_formats() -> None:
    assert message_text("plain") == "plain"
    assert message_text([{"role": "assistant", "content": "only"}]) == "only"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]
    assert message_text(parts) == "ab"
    assert message_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
                        ) == "system: s\n\nuser: u"


def test_fleet_rewards_blocking_and_async(settings: Settings, workers: Any) -> None:
    """Through Redis and worker processes: the same scores, from both fleet variants."""
    workers(n=1)
    prompts, completions, kwargs = grpo_call(conversational=True)
    expected = expected_scores(prompts, completions, kwargs["solution"])
    blocking = make_trl_reward(settings, timeout_s=60)
    assert blocking(prompts, completions, **kwargs) == expected
    async_reward = make_async_trl_reward(settings, timeout_s=60, name="judge_async")
    assert inspect.iscoroutinefunction(async_reward)
    assert async_reward.__name__ == "judge_async"
    fresh = [c + [{"role": "assistant", "content": " Done."}] if c[0]["content"] else c
             for c in completions]  # not in the fleet's cache yet
    assert asyncio.run(async_reward(prompts, fresh, **kwargs)) == expected_scores(
        prompts, fresh, kwargs["solution"])
