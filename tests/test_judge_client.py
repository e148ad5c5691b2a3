"""The worker's judge client without HTTP: ``JudgeClient`` on an in-memory judge
(``fakes.InMemoryJudge``, injected as its transport factory).

The client's own logic, each call made through ``JudgeClient.judge`` as a worker makes it:
the request it sends, the parameters an endpoint refuses (learned once, per endpoint and
model, and left out from then on), a reply cut by its token limit (counted ``cut``, billed,
never scored), reasoning tokens in the usage and the metrics, the verdict read after the
thinking, a logprobs verdict, and the failover between endpoints. ``test_judge_transport``
covers the HTTP transports themselves against a real server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fakes import Answer, InMemoryJudge, completion, error_answer, unreachable

from rewardq.broker.errors import CutReplyError, JudgeError, PermanentJudgeError
from rewardq.broker.schemas import JudgeVerdict, ScoreItem
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import judge_request, judge_spec
from rewardq.judge.rubrics import builtin_rubrics
from rewardq.monitoring.costs import PriceTable
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.workers.endpoints import NoEndpointError
from rewardq.workers.judge_client import JudgeClient

A = "http://judge-a.invalid/v1"
B = "http://judge-b.invalid/v1"
CHAT = "rewardq-local-judge"
REASONING = "gpt-5-mini"
ITEM = ScoreItem(id="i1", prompt="What is 2 + 2?", response="The answer is 4.", reference="4")


def settings(*urls: str, **overrides: Any) -> Settings:
    return Settings(judge_base_urls=list(urls or [A]), **overrides)


def judged(config: Settings, judge: InMemoryJudge, calls: int = 1,
           metrics: WorkerMetrics | None = None) -> list[JudgeVerdict | JudgeError]:
    """``calls`` judge calls for :data:`ITEM`, one after the other on one client, as a
    worker makes them: each verdict, or the ``JudgeError`` it raised."""
    async def run() -> list[JudgeVerdict | JudgeError]:
        client = JudgeClient(config, metrics=metrics, prices=PriceTable.from_settings(config),
                             transport_factory=judge.transport)
        item = builtin_rubrics().assign([ITEM])[0]
        out: list[JudgeVerdict | JudgeError] = []
        try:
            for _ in range(calls):
                try:
                    out.append(await client.judge(judge_spec(config), item))
                except JudgeError as error:
                    out.append(error)
        finally:
            await client.close()
        return out

    return asyncio.run(run())


def verdict(outcome: JudgeVerdict | JudgeError) -> JudgeVerdict:
    assert isinstance(outcome, JudgeVerdict), outcome
    return outcome


# -- the request -----------------------------------------------------------------------

def test_the_client_sends_the_judge_cores_request_and_reads_its_score() -> None:
    config = settings()
    judge = InMemoryJudge()
    (outcome,) = judged(config, judge)
    assert verdict(outcome).raw_score == 7.0
    spec = judge_spec(config)
    rubric = builtin_rubrics().rubric_for(spec, builtin_rubrics().assign([ITEM])[0])
    expected = judge_request(spec, rubric, builtin_rubrics().assign([ITEM])[0])
    assert judge.bodies() == [expected]
    assert expected["temperature"] == 0.0 and expected["max_tokens"] == 64
    assert [(t.base_url, t.closed) for t in judge.transports] == [(A, True)]


# -- parameters an endpoint refuses ----------------------------------------------------

def refusing(param: str, *, code: str | None = "unsupported_parameter",
             message: str | None = None) -> Any:
    """An endpoint that answers 400 to any body carrying ``param``."""
    def respond(base_url: str, body: dict[str, Any]) -> Answer:
        if param in body:
            return error_answer(400, message or f"Unsupported parameter: '{param}' is not "
                                f"supported with this model.", code=code,
                                param=param if code else None)
        return completion("Score: 8")
    return respond


def test_a_refused_parameter_is_learned_once_and_left_out_from_then_on(
        caplog: pytest.LogCaptureFixture) -> None:
    judge = InMemoryJudge(refusing("temperature"))
    metrics = WorkerMetrics()
    with caplog.at_level(logging.WARNING, logger="rewardq.judge.judge_request"):
        outcomes = judged(settings(), judge, calls=3, metrics=metrics)
    assert [verdict(o).raw_score for o in outcomes] == [8.0, 8.0, 8.0]
    assert ["temperature" in body for body in judge.bodies()] == [True, False, False, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'temperature'" in warnings[0] and A in warnings[0]
    # the refused POST was part of the call, which succeeded: nothing counted as an error
    assert metrics.snapshot().requests == {(CHAT, "ok"): 3}


def test_a_refused_max_tokens_goes_out_as_max_completion_tokens() -> None:
    judge = InMemoryJudge(refusing("max_tokens"))
    outcomes = judged(settings(), judge, calls=2)
    assert all(isinstance(o, JudgeVerdict) for o in outcomes), outcomes
    first, retried, later = judge.bodies()
    assert first["max_tokens"] == 64 and "max_completion_tokens" not in first
    for body in (retried, later):
        assert body["max_completion_tokens"] == 64 and "max_tokens" not in body


def test_a_refusal_named_only_in_its_message_drops_logprobs_with_top_logprobs() -> None:
    """vLLM-style: no error code, the field named in the message; logprobs and
    top_logprobs go together, and the score falls back to the written integer."""
    judge = InMemoryJudge(refusing("logprobs", code=None,
                                   message="logprobs is not supported by this model"))
    (outcome,) = judged(settings(judge_score_mode="logprobs"), judge)
    asked, retried = judge.bodies()
    assert asked["logprobs"] is True and asked["top_logprobs"] > 0
    assert "logprobs" not in retried and "top_logprobs" not in retried
    assert verdict(outcome).score_source == "parsed_fallback"
    assert verdict(outcome).raw_score == 8.0


def test_what_an_endpoint_refuses_is_learned_for_that_endpoint_alone() -> None:
    def respond(base_url: str, body: dict[str, Any]) -> Answer:
        return refusing("temperature")(base_url, body) if base_url == A \
            else completion("Score: 8")

    judge = InMemoryJudge(respond)
    outcomes = judged(settings(A, B), judge, calls=4)
    assert all(isinstance(o, JudgeVerdict) for o in outcomes), outcomes
    assert ["temperature" in body for body in judge.bodies(A)] == [True, False, False]
    assert ["temperature" in body for body in judge.bodies(B)] == [True, True]


def test_a_400_naming_no_parameter_is_raised_after_one_post() -> None:
    judge = InMemoryJudge(lambda url, body: error_answer(400, "Invalid prompt: too long"))
    metrics = WorkerMetrics()
    (outcome,) = judged(settings(), judge, metrics=metrics)
    assert isinstance(outcome, PermanentJudgeError) and outcome.status_code == 400
    assert "Invalid prompt" in str(outcome)
    assert len(judge.requests) == 1
    assert metrics.snapshot().requests == {(CHAT, "400"): 1}


# -- cut replies and reasoning tokens --------------------------------------------------

@pytest.mark.parametrize("reply", [
    completion("Score: ", finish_reason="length", completion_tokens=64),
    completion("<think>It looks like a 3, or maybe", finish_reason="stop",
               completion_tokens=64),
], ids=["finish-reason-length", "thinking-left-open"])
def test_a_cut_reply_is_counted_cut_billed_and_never_scored(reply: Answer) -> None:
    judge = InMemoryJudge(lambda url, body: reply)
    metrics = WorkerMetrics()
    (outcome,) = judged(settings(), judge, metrics=metrics)
    assert isinstance(outcome, CutReplyError), outcome
    assert "REWARDQ_JUDGE_MAX_TOKENS (now 64)" in str(outcome)
    snapshot = metrics.snapshot()
    assert snapshot.requests == {(CHAT, "cut"): 1}
    assert snapshot.completion_tokens == {CHAT: 64}  # the provider bills a cut reply too
    assert len(judge.requests) == 1


def test_reasoning_tokens_are_counted_in_the_verdict_the_metrics_and_the_cost() -> None:
    judge = InMemoryJudge(lambda url, body: completion(
        "Score: 9", prompt_tokens=200, completion_tokens=540, reasoning_tokens=500))
    metrics = WorkerMetrics()
    config = settings(judge_model=REASONING, judge_prices={REASONING: (1.0, 10.0)})
    (outcome,) = judged(config, judge, metrics=metrics)
    usage = verdict(outcome).usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.reasoning_tokens) == \
        (200, 540, 500)
    snapshot = metrics.snapshot()
    assert snapshot.reasoning_tokens == {REASONING: 500}
    assert snapshot.completion_tokens == {REASONING: 540}
    assert snapshot.cost_usd[REASONING] == pytest.approx((200 * 1.0 + 540 * 10.0) / 1e6)
    # a judge that thinks: its family's budget and parameters
    (body,) = judge.bodies()
    assert body["max_completion_tokens"] == 8192
    assert "max_tokens" not in body and "temperature" not in body


def test_a_cut_reasoning_reply_names_its_reasoning_tokens() -> None:
    judge = InMemoryJudge(lambda url, body: completion(
        "", finish_reason="length", completion_tokens=100, reasoning_tokens=100))
    metrics = WorkerMetrics()
    (outcome,) = judged(settings(judge_model=REASONING, judge_max_tokens=100), judge,
                        metrics=metrics)
    assert isinstance(outcome, CutReplyError), outcome
    assert "inside its thinking" in str(outcome) and "100 of them reasoning" in str(outcome)
    assert metrics.snapshot().reasoning_tokens == {REASONING: 100}
    assert metrics.snapshot().requests == {(REASONING, "cut"): 1}


# -- the verdict after the thinking ----------------------------------------------------

@pytest.mark.parametrize("reply", [
    completion("<think>A 2? No, a 3 at most.</think>Score: 9"),
    completion("<thinking>Score: 1</thinking>\n9"),
    completion("<think>draft: 2</think><think>draft: 3</think> The grade is 9."),
    completion("Score: 9", reasoning_content="I would give it a 2."),
], ids=["think", "thinking", "two-blocks", "reasoning-field"])
def test_the_verdict_is_read_after_the_thinking(reply: Answer) -> None:
    (outcome,) = judged(settings(), InMemoryJudge(lambda url, body: reply))
    assert verdict(outcome).raw_score == 9.0


# -- endpoints -------------------------------------------------------------------------

@pytest.mark.parametrize("down", ["503", "unreachable"])
def test_a_down_endpoint_fails_over_to_another_within_the_call(down: str) -> None:
    def respond(base_url: str, body: dict[str, Any]) -> Answer | JudgeError:
        if base_url == B:
            return completion("Score: 6")
        return error_answer(503, "overloaded") if down == "503" else unreachable(base_url)

    judge = InMemoryJudge(respond)
    metrics = WorkerMetrics()
    (outcome,) = judged(settings(A, B), judge, metrics=metrics)
    assert verdict(outcome).raw_score == 6.0
    assert [r.base_url for r in judge.requests] == [A, B]
    status = "503" if down == "503" else "network"
    assert metrics.snapshot().requests == {(CHAT, status): 1, (CHAT, "ok"): 1}
    endpoints = metrics.endpoint_snapshot()
    assert endpoints.failovers == {A: 1}
    assert endpoints.requests == {(A, status): 1, (B, "ok"): 1}


def test_a_refusal_is_the_calls_answer_not_a_down_endpoint() -> None:
    judge = InMemoryJudge(lambda url, body: error_answer(401, "Incorrect API key provided"))
    metrics = WorkerMetrics()
    (outcome,) = judged(settings(A, B), judge, metrics=metrics)
    assert isinstance(outcome, PermanentJudgeError) and outcome.status_code == 401
    assert [r.base_url for r in judge.requests] == [A]
    assert metrics.endpoint_snapshot().failovers == {}


def test_with_every_breaker_open_the_call_is_not_made() -> None:
    judge = InMemoryJudge(lambda url, body: unreachable(url))
    metrics = WorkerMetrics()
    first, second = judged(settings(A, B, judge_breaker_failures=1,
                                    judge_breaker_cooldown_s=60), judge, calls=2,
                           metrics=metrics)
    assert isinstance(first, JudgeError) and not isinstance(first, NoEndpointError)
    assert isinstance(second, NoEndpointError), second
    assert second.retry_after_s is not None and 0 < second.retry_after_s <= 60
    assert [r.base_url for r in judge.requests] == [A, B]  # none for the second call
    assert metrics.snapshot().requests == {(CHAT, "network"): 2}


# -- logprobs --------------------------------------------------------------------------

def test_in_logprobs_mode_the_score_is_the_expectation_where_the_judge_wrote_it() -> None:
    half = -0.6931471805599453  # ln 0.5
    tokens = [{"token": "Score", "logprob": 0.0, "top_logprobs": []},
              {"token": ":", "logprob": 0.0, "top_logprobs": []},
              {"token": " ", "logprob": 0.0, "top_logprobs": []},
              {"token": "8", "logprob": half,
               "top_logprobs": [{"token": "8", "logprob": half},
                                {"token": "6", "logprob": half}]}]
    judge = InMemoryJudge(lambda url, body: completion("Score: 8", logprobs=tokens))
    (outcome,) = judged(settings(judge_score_mode="logprobs"), judge)
    assert verdict(outcome).score_source == "logprobs"
    assert verdict(outcome).raw_score == pytest.approx(7.0)
    (body,) = judge.bodies()
    assert body["logprobs"] is True and body["top_logprobs"] == 20
