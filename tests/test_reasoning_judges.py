"""Today's judges and today's rollouts through real worker processes: the local judge plays
OpenAI's reasoning models, open reasoning models with and without a reasoning parser, and
endpoints without structured outputs (``rewardq.judge_server.profiles``); rollouts carry thinking,
end-of-turn tokens, nothing at all, or are cut.

Every check of what the judge was sent or shown is made at the judge (``GET /stats``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import worker_logs
from scoring_data import expected, make_items

from rewardq.broker.schemas import JudgeOptions, ResultStatus, ScoreItem
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import judge_spec
from rewardq.judge.rubrics import builtin_rubrics
from rewardq.judge_server.digit_logprobs import intended_expectation, neighbour
from rewardq.monitoring.costs import PriceTable
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess
from rewardq.workers.judge_client import JudgeClient

REFUSED = ("max_tokens", "temperature", "logprobs", "top_logprobs")


def _score(settings: Settings, items: list[dict[str, Any]], timeout: float = 120) -> list:
    with RewardClient(settings) as client:
        return client.submit(items, step=1).result(timeout=timeout)


def _assert_all_ok_with_the_judges_scores(items: list[dict[str, Any]], results: list,
                                         logs: str) -> None:
    for item, result in zip(items, results, strict=True):
        assert result.status is ResultStatus.OK, (result, logs[-3000:])
        assert result.score == pytest.approx(expected(item)[0]), item["id"]


@pytest.mark.parametrize("mode", ["parsed", "logprobs"])
def test_gpt5_with_only_its_model_name(settings: Settings, workers, judge_profile, tmp_path,
                                       mode: str) -> None:
    judge: JudgeProcess = judge_profile("openai-reasoning")
    run = settings.model_copy(update={"judge_model": "gpt-5-mini", "judge_score_mode": mode})
    workers(1, judge_model="gpt-5-mini", judge_score_mode=mode)
    items = make_items(40, f"gpt5-{mode}")
    results = _score(run, items)
    _assert_all_ok_with_the_judges_scores(items, results, worker_logs(tmp_path))
    assert {r.score_source for r in results} == \
        {"parsed" if mode == "parsed" else "parsed_fallback"}
    stats = judge.stats()
    assert stats["responses_by_status"] == {"200": 40}
    assert not set(REFUSED) & set(stats["params_seen"]), stats["params_seen"]
    assert stats["params_seen"]["max_completion_tokens"] == 40
    assert all(r.usage.reasoning_tokens > 0 for r in results)


def test_refused_parameters_are_learned_once(settings: Settings, workers, judge_profile,
                                             tmp_path) -> None:
    """A deployment name the family table cannot know: the endpoint's own 400s teach the
    workers, and after that the judge receives none of the refused parameters."""
    judge: JudgeProcess = judge_profile("openai-reasoning")
    # A model rewardq cannot know thinks: its budget is the user's to set.
    learn = {"judge_model": "team-judge-deployment", "judge_score_mode": "logprobs",
             "max_concurrent_requests": 4, "judge_max_tokens": 4096}
    run = settings.model_copy(update=learn)
    workers(1, **learn)
    first = make_items(24, "learn-1")
    _assert_all_ok_with_the_judges_scores(first, _score(run, first), worker_logs(tmp_path))
    assert judge.stats()["responses_by_status"].get("400", 0) >= 1
    logs = worker_logs(tmp_path)
    assert "refuses 'max_tokens'" in logs and "sending max_completion_tokens instead" in logs
    assert logs.count("refuses 'temperature'") == 1

    judge.reset_stats()
    second = make_items(24, "learn-2")
    results = _score(run, second)
    _assert_all_ok_with_the_judges_scores(second, results, worker_logs(tmp_path))
    stats = judge.stats()
    assert stats["responses_by_status"] == {"200": 24}
    assert not set(REFUSED) & set(stats["params_seen"]), stats["params_seen"]
    assert {r.score_source for r in results} == {"parsed_fallback"}


def test_thinking_in_the_content_is_never_scored(settings: Settings, workers, judge_profile,
                                                 tmp_path) -> None:
    judge_profile("think-in-content", thinking_tokens=400)
    model = "deepseek-r1-distill-qwen-7b"
    run = settings.model_copy(update={"judge_model": model})
    workers(1, judge_model=model)
    items = make_items(30, "think-ok")
    # The family's budget (8,192) fits the thinking: every verdict is the final one, while
    # each draft in the thinking says the opposite end of the scale.
    _assert_all_ok_with_the_judges_scores(items, _score(run, items), worker_logs(tmp_path))


@pytest.mark.parametrize("budget", [64, 300])
def test_a_budget_that_cuts_the_thinking_fails_every_item_naming_the_cut(
        settings: Settings, workers, judge_profile, budget: int) -> None:
    judge: JudgeProcess = judge_profile("think-in-content", thinking_tokens=400)
    model = "qwq-32b"
    run = settings.model_copy(update={"judge_model": model, "judge_max_tokens": budget})
    workers(1, judge_model=model, judge_max_tokens=budget)
    results = _score(run, make_items(12, f"think-cut-{budget}"))
    for result in results:
        assert result.status is ResultStatus.FAILED and result.score is None, result
        assert "cut by its token limit" in (result.error or "")
        assert f"REWARDQ_JUDGE_MAX_TOKENS (now {budget})" in (result.error or "")
        assert result.attempts == 1  # not retried: the same budget cuts it again
    assert judge.stats()["requests_total"] == 12


def test_the_reasoning_field_is_never_scored(settings: Settings, workers, judge_profile,
                                             tmp_path) -> None:
    judge_profile("reasoning-field", thinking_tokens=200)
    run = settings.model_copy(update={"judge_model": "Qwen/Qwen3-8B"})
    workers(1, judge_model="Qwen/Qwen3-8B")
    items = make_items(24, "field")
    _assert_all_ok_with_the_judges_scores(items, _score(run, items), worker_logs(tmp_path))


@pytest.mark.parametrize("refuse", [False, True])
def test_structured_outputs_score_every_item_on_and_refused(
        settings: Settings, workers, judge_profile, tmp_path, refuse: bool) -> None:
    judge: JudgeProcess = judge_profile("plain", refuse_response_format=refuse)
    run = settings.model_copy(update={"judge_structured_output": True,
                                      "max_concurrent_requests": 2})
    workers(1, judge_structured_output=True, max_concurrent_requests=2)
    items = make_items(20, f"structured-{refuse}")
    _assert_all_ok_with_the_judges_scores(items, _score(run, items), worker_logs(tmp_path))
    stats = judge.stats()
    if refuse:
        assert worker_logs(tmp_path).count("refuses 'response_format'") == 1
        assert stats["responses_by_status"].get("400", 0) <= 2  # the calls in flight then
    else:
        assert stats["params_seen"]["response_format"] == 20


def test_a_step_of_rollouts_as_policies_write_them(settings: Settings, workers,
                                                   judge: JudgeProcess) -> None:
    workers(1)
    thinking = "Let me reconsider the sum step by step. " * 2_800  # ~112k characters
    q = "[rollouts] What is 20 + 22?"
    batch = [
        {"id": "short", "prompt": q, "response": "The answer is 42.", "reference": "42"},
        {"id": "empty", "prompt": q, "response": "", "reference": "42"},
        {"id": "long-thinking", "prompt": q, "reference": "42",
         "response": f"<think>{thinking} Maybe it is 41?</think>\n\nThe answer is 42."},
        {"id": "cut", "prompt": q, "reference": "42", "response": f"<think>{thinking}"},
        {"id": "im-end", "prompt": q, "reference": "42",
         "response": "<think>easy</think>The answer is 41.<|im_end|>"},
        {"id": "long-answer", "prompt": q, "reference": "42",
         "response": "Working. " * 22_300 + "The answer is 42."},
    ]
    assert len(batch[2]["response"]) > 110_000 and len(batch[5]["response"]) > 200_000
    results = {r.id: r for r in _score(settings, batch)}
    assert results["short"].status is ResultStatus.OK and results["short"].score == 1.0
    assert results["long-thinking"].score == 1.0
    assert results["im-end"].score == 0.0
    assert results["long-answer"].score == 1.0  # the tail (the conclusion) is kept
    for name, why in (("empty", "empty"), ("cut", "never closed")):
        assert results[name].status is ResultStatus.NO_ANSWER and results[name].score is None
        assert why in (results[name].error or "")
    stats = judge.stats()
    # short and long-thinking show the judge the same final answer: judged once
    assert stats["requests_total"] == 3
    assert stats["requests_with_thinking"] == 0 and stats["requests_with_end_of_turn"] == 0
    assert stats["max_response_chars"] <= 8192 * 4 + 100


def test_an_ensemble_of_a_reasoning_and_a_plain_judge(settings: Settings, workers,
                                                      judge_profile, tmp_path) -> None:
    """Judges differ: the open reasoning judge thinks in its content, the other has its
    thinking switched off by its own options (Qwen3's chat-template switch)."""
    judge: JudgeProcess = judge_profile("think-in-content", thinking_tokens=300)
    ensemble = {"judge_ensemble": ["qwq-32b", "llama-3.1-8b-instruct"],
                "judge_options": {"llama-3.1-8b-instruct": JudgeOptions(extra_body={
                    "chat_template_kwargs": {"enable_thinking": False}})}}
    run = settings.model_copy(update=ensemble)
    workers(1, **ensemble)
    items = make_items(12, "ensemble-reasoning")
    results = _score(run, items)
    _assert_all_ok_with_the_judges_scores(items, results, worker_logs(tmp_path))
    for result in results:
        assert [j.judge for j in result.judges or []] == ["qwq-32b", "llama-3.1-8b-instruct"]
    stats = judge.stats()
    assert stats["params_seen"]["chat_template_kwargs"] == 12  # the plain judge's calls only
    assert stats["requests_total"] == 24


def test_group_judging_with_a_reasoning_judge(settings: Settings, workers, judge_profile,
                                              tmp_path) -> None:
    judge_profile("think-in-content", thinking_tokens=300)
    group = {"judge_model": "qwq-32b", "judge_group_mode": "listwise", "judge_group_size": 4}
    run = settings.model_copy(update=group)
    workers(1, **group)
    q = "[group-reasoning] What is 3 + 4?"
    items = [{"id": f"m{i}", "prompt": q, "reference": "7", "uid": "g0",
              "response": f"<think>hmm</think>The answer is {7 if i % 2 == 0 else 8}."}
             for i in range(4)]
    results = _score(run, items)
    assert all(r.status is ResultStatus.OK for r in results), (results, worker_logs(tmp_path))
    right = [r.score for r in results[0::2]]
    wrong = [r.score for r in results[1::2]]
    assert min(right) > max(wrong)  # the final grades, not the reversed drafts


def test_metrics_count_cut_replies_and_reasoning_tokens_in_the_cost(
        judge_profile) -> None:
    """The worker's judge client against the real judge: a reasoning reply's tokens, its
    reasoning share, its cost, and a cut reply under its own status."""
    judge: JudgeProcess = judge_profile("openai-reasoning", reasoning_tokens={"medium": 500})
    metrics = WorkerMetrics()
    priced = Settings(judge_base_url=judge.base_url, judge_model="gpt-5-mini",
                      judge_prices={"gpt-5-mini": (1.0, 10.0)})
    item = ScoreItem(id="a", prompt="[m] What is 1 + 1?", response="2", reference="2")

    async def run(settings: Settings) -> object:
        client = JudgeClient(settings, metrics=metrics, prices=PriceTable.from_settings(settings))
        try:
            return await client.judge(judge_spec(settings), builtin_rubrics().assign([item])[0])
        except Exception as exc:  # noqa: BLE001 - the cut is what this test wants to see
            return exc
        finally:
            await client.close()

    verdict = asyncio.run(run(priced))
    snapshot = metrics.snapshot()
    completion = snapshot.completion_tokens["gpt-5-mini"]
    assert snapshot.reasoning_tokens["gpt-5-mini"] == 500 < completion
    assert snapshot.cost_usd["gpt-5-mini"] == pytest.approx(
        (snapshot.prompt_tokens["gpt-5-mini"] * 1.0 + completion * 10.0) / 1e6)
    assert getattr(verdict, "score", None) == 1.0

    cut = asyncio.run(run(priced.model_copy(update={"judge_max_tokens": 100})))
    assert "cut by its token limit" in str(cut)
    assert metrics.snapshot().requests[("gpt-5-mini", "cut")] == 1


@pytest.mark.parametrize("how", ["inward", "up"])
def test_digit_by_digit_logprobs_give_the_score_the_judge_meant(
        settings: Settings, workers, judge_profile, tmp_path, how: str) -> None:
    """A Qwen-style tokenizer writes 10 as "1", "0": each score is within 0.05 of the
    expectation the judge meant, 1 and 10 included; where a "1" was only offered its
    share cannot be split and the result says so (``logprobs_partial``)."""
    judge_profile("digit-logprobs", digit_confidence=0.8, digit_neighbour=how)
    run = settings.model_copy(update={"judge_score_mode": "logprobs"})
    workers(1, judge_score_mode="logprobs")
    items = make_items(36, f"digits-{how}")
    results = _score(run, items)
    grades = set()
    for item, result in zip(items, results, strict=True):
        assert result.status is ResultStatus.OK, (result, worker_logs(tmp_path)[-2000:])
        grade = int(expected(item)[1])
        grades.add(grade)
        meant = intended_expectation(grade, 0.8, how)
        assert result.score == pytest.approx((meant - 1) / 9, abs=0.05), (item["id"], grade)
        assert result.score_source in ("logprobs", "logprobs_partial")
        if result.score_source == "logprobs_partial":
            assert "1" in str(neighbour(grade, how)) and grade != 1
    assert {1, 10} <= grades and len(grades) >= 4


@pytest.mark.parametrize("mode", ["listwise", "pairwise"])
def test_a_group_with_members_without_an_answer_is_judged_without_them(
        settings: Settings, workers, judge: JudgeProcess, tmp_path, mode: str) -> None:
    """Group members with nothing to judge still complete their group: they come back
    ``no_answer`` at once and the group is judged on the others (no wait, no timeout)."""
    group = {"judge_group_mode": mode, "judge_group_size": 4, "chunk_deadline_s": 60}
    run = settings.model_copy(update=group)
    workers(1, **group)
    q = f"[group-no-answer-{mode}] What is 5 + 6?"
    responses = ["The answer is 11.", "", "<think>still going", "The answer is 12."]
    items = [{"id": f"m{i}", "prompt": q, "reference": "11", "uid": "g0", "response": r}
             for i, r in enumerate(responses)]
    results = _score(run, items, timeout=50)
    logs = worker_logs(tmp_path)
    assert [r.status for r in results] == [ResultStatus.OK, ResultStatus.NO_ANSWER,
                                          ResultStatus.NO_ANSWER, ResultStatus.OK], logs
    assert results[0].score > results[3].score
    assert judge.stats()["requests_with_thinking"] == 0
