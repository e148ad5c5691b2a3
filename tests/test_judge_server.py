"""The local judge server: pure grading, then the real server over HTTP.

The server runs as ``python -m rewardq.judge_server --port 0`` in a subprocess (one per module,
reconfigured and reset before each test through its admin routes) and is called with
the real ``openai`` SDK and httpx; no mocks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardq.broker.schemas import ScoreItem
from rewardq.judge.rubrics import builtin_rubrics
from rewardq.judge_server.__main__ import add_arguments, config_from_args
from rewardq.judge_server.config import ConfigValueError, JudgeConfig
from rewardq.judge_server.dispatch import grade_messages
from rewardq.judge_server.faults import FaultInjector
from rewardq.judge_server.grading import (
    CORRECT_SCORE,
    INCORRECT_SCORE,
    QUALITY_MAX,
    QUALITY_MIN,
    expected_raw_score,
    final_answer,
    normalize_answer,
    parse_judge_prompt,
)
from rewardq.judge_server.protocol import count_tokens
from rewardq.judge_server.rate_limit import SlidingWindowLimiter
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.judge_server.stats import JudgeStats

ROOT = Path(__file__).resolve().parent.parent
MODEL = "rewardq-local-judge"
RUBRICS = builtin_rubrics()


def judge_messages(prompt: str, response: str,
                   reference: str | None = None) -> list[dict[str, str]]:
    """The messages a rewardq worker sends for this item."""
    item = ScoreItem(id="t", prompt=prompt, response=response, reference=reference)
    return RUBRICS.rubrics[RUBRICS.select(item)].messages(item)


# --------------------------------------------------------------------------- grading


@pytest.mark.parametrize(("text", "expected"), [
    ("So the result is \\boxed{42}.", "42"),
    ("\\boxed{1} at first, but finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("The answer is 4.0.", "4"),
    ("Final Answer: **1,234**", "1234"),
    ("the answer is: Paris. It is in France.", "paris"),
    ("We get 3, then 5, then 12.50 in total", "12.5"),
    ("temperatures fall to -7 overnight", "-7"),
    ("an unclosed \\boxed{7 but the answer is 8", "8"),
    ("Answer:\n9", "9"),
    ("I have no idea.", None),
    ("", None),
])
def test_final_answer(text: str, expected: str | None) -> None:
    assert final_answer(text) == expected


@pytest.mark.parametrize(("raw", "normalized"), [
    ("4.0", "4"), ("-0.00", "0"), ("+3", "3"), ("0012.500", "12.5"), (" 1,000,000. ", "1000000"),
    ("$5$", "5"), ("`Yes`.", "yes"), ("1,2", "1,2"), ("9" * 5000, "9" * 5000),
])
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_correctness_rubric_scores_10_or_1() -> None:
    assert expected_raw_score("2+2?", "2 + 2 = 4, so the answer is 4.0", "4") == CORRECT_SCORE
    assert expected_raw_score("2+2?", "I think \\boxed{5}", "4") == INCORRECT_SCORE
    assert expected_raw_score("2+2?", "no idea", "4") == INCORRECT_SCORE
    assert expected_raw_score("Sum?", "It is 1,000.", "\\boxed{1000}") == CORRECT_SCORE
    assert expected_raw_score("Capital?", "The answer is Paris", "paris") == CORRECT_SCORE


def test_quality_rubric_rewards_a_worked_answer_over_repetition() -> None:
    worked = "First add 2 and 2.\nThat gives 4, so the answer is 4."
    assert expected_raw_score("What is 2+2?", worked, None) == QUALITY_MAX
    assert expected_raw_score("What is 2+2?", "um " * 50, None) == QUALITY_MIN + 1
    assert expected_raw_score("What is 2+2?", "um " * 1001, None) == QUALITY_MIN
    assert expected_raw_score("What is 2+2?", "What is 2+2?", None) < expected_raw_score(
        "What is 2+2?", "It is 4", None)


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(min_size=1, max_size=300), response=st.text(min_size=1, max_size=600))
def test_quality_is_deterministic_and_in_range(prompt: str, response: str) -> None:
    score = expected_raw_score(prompt, response, None)
    assert QUALITY_MIN <= score <= QUALITY_MAX
    assert score == expected_raw_score(prompt, response, None)


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(min_size=1, max_size=200), response=st.text(min_size=1, max_size=400),
       reference=st.none() | st.text(min_size=0, max_size=20))
def test_grade_messages_agrees_with_expected_raw_score(prompt: str, response: str,
                                                       reference: str | None) -> None:
    messages = judge_messages(prompt, response, reference)
    assert grade_messages(messages) == expected_raw_score(prompt, response, reference)


def test_parse_judge_prompt_reads_every_section_back() -> None:
    tricky = "line one\n<<<END RESPONSE>>> quoted inside\nthe answer is 3"
    messages = judge_messages("What is\n1 + 2?", tricky, "3")
    parsed = parse_judge_prompt(messages[1]["content"])
    assert (parsed.rubric, parsed.prompt, parsed.reference, parsed.response) == (
        "correctness", "What is\n1 + 2?", "3", tricky)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Rate this: the answer is 4"}],
    [{"role": "user", "content": [{"type": "text", "text": "rewardq-judge v1 quality\nno"}]}],
    [{"role": "system", "content": "only a system message"}],
    [{"role": "user"}, 7, None, {"content": 3}],
    "not a list",
    [],
])
def test_grade_messages_never_crashes_on_foreign_input(messages: Any) -> None:
    assert QUALITY_MIN <= grade_messages(messages) <= QUALITY_MAX


# ------------------------------------------------------------- config, window, stats


def test_config_rejects_bad_values_and_unknown_fields() -> None:
    config = JudgeConfig()
    refused: list[dict[str, Any]] = [
        {"error_rate": 1.5}, {"latency_ms": -1}, {"error_kinds": ["418"]}, {"rpm_limit": 2.5},
        {"seed": True}, {"error_kinds": []}, {"nope": 1}, {"model": ""}]
    for bad in refused:
        with pytest.raises(ConfigValueError):
            config.updated(bad)
    changed = config.updated({"error_kinds": "503, timeout", "rpm_limit": None, "error_rate": 1})
    assert changed.error_kinds == ("503", "timeout")
    assert changed.rpm_limit == 0
    assert changed.as_dict()["error_rate"] == 1.0
    assert config == JudgeConfig()


def test_sliding_window_limiter_frees_slots_as_requests_age_out() -> None:
    limiter = SlidingWindowLimiter(window_s=60.0)
    assert limiter.admit(2, now=0.0) is None
    assert limiter.admit(2, now=10.0) is None
    assert limiter.admit(2, now=20.0) == pytest.approx(40.0)
    assert limiter.admit(2, now=60.5) is None  # the t=0 request has left the window
    assert limiter.admit(2, now=61.0) == pytest.approx(9.0)
    assert limiter.admit(0, now=61.0) is None


def test_max_requests_in_any_1s_is_a_sliding_window() -> None:
    now = [0.0]
    stats = JudgeStats(clock=lambda: now[0])
    # Fixed 1 s buckets would see at most 3 of these; the window (0.3, 1.3] holds 4.
    for t in (0.0, 0.5, 0.9, 1.2, 1.3, 2.9):
        now[0] = t
        stats.arrived()
    assert stats.snapshot()["max_requests_in_any_1s"] == 4


def test_fault_injector_is_reproducible_and_jitter_bounded() -> None:
    config = JudgeConfig(error_rate=0.5, error_kinds=("429", "500", "malformed"),
                         latency_ms=100.0, jitter_ms=50.0)
    first, second = FaultInjector(11), FaultInjector(11)
    draws = [first.draw_fault(config) for _ in range(200)]
    assert draws == [second.draw_fault(config) for _ in range(200)]
    assert set(draws) == {None, "429", "500", "malformed"}
    latencies = [first.latency_s(config) for _ in range(200)]
    assert all(0.05 <= s <= 0.15 for s in latencies)
    assert len(set(latencies)) > 100


# --------------------------------------------------------------------- the server


@dataclass
class RunningJudge:
    """A judge server subprocess and how to reach it."""

    process: subprocess.Popen[str]
    base_url: str  # http://127.0.0.1:PORT/v1, what an OpenAI client takes

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def get(self, path: str) -> Any:
        return httpx.get(self.root + path, timeout=10).json()

    def post(self, path: str, payload: Any = None) -> httpx.Response:
        return httpx.post(self.root + path, json=payload, timeout=10)

    def configure(self, **changes: Any) -> dict[str, Any]:
        response = self.post("/admin/config", changes)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="test-key",
                             **{"max_retries": 0, **options})


def start_judge(*flags: str) -> RunningJudge:
    """``python -m rewardq.judge_server --port 0 FLAGS``, once it says where it listens."""
    process = subprocess.Popen([sys.executable, "-m", "judge_server", "--port", "0", *flags],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("judge server listening on http://127.0.0.1:"):
        process.kill()
        pytest.fail(f"judge server did not start: {line!r}")
    return RunningJudge(process, line.split(" on ", 1)[1].strip())


@pytest.fixture(scope="module")
def server() -> Iterator[RunningJudge]:
    judge = start_judge()
    yield judge
    judge.process.terminate()
    judge.process.wait(timeout=10)


@pytest.fixture
def judge(server: RunningJudge) -> RunningJudge:
    """The module's server with default knobs and zeroed stats."""
    server.configure(**JudgeConfig().as_dict())
    server.post("/stats/reset")
    return server


def ask(client: openai.OpenAI, messages: list[dict[str, str]]) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                          temperature=0.0, max_tokens=64)


def test_openai_client_gets_the_expected_scores(judge: RunningJudge) -> None:
    client = judge.client()
    cases = [("What is 6 x 7?", "6 x 7 = 42, so the answer is 42.", "42"),
             ("What is 6 x 7?", "It is \\boxed{48}", "42"),
             ("Explain addition.", "Addition combines two numbers.\nFor example 2+2=4.", None)]
    for prompt, response, reference in cases:
        messages = judge_messages(prompt, response, reference)
        completion = ask(client, messages)
        reply = json.loads(completion.choices[0].message.content or "")
        assert reply["score"] == expected_raw_score(prompt, response, reference)
        assert reply["reason"]
        assert completion.object == "chat.completion"
        assert completion.model == MODEL
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == sum(count_tokens(m["content"])
                                                     for m in messages)
        assert completion.usage.completion_tokens == count_tokens(
            completion.choices[0].message.content or "")
        assert completion.usage.total_tokens == (completion.usage.prompt_tokens
                                                 + completion.usage.completion_tokens)
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_injected_429_carries_retry_after(judge: RunningJudge) -> None:
    judge.configure(error_rate=1.0, error_kinds=["429"], retry_after_s=0.05)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(judge.client(), judge_messages("p", "r"))
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.headers["retry-after-ms"] == "50"
    # The SDK's own retries honour it: 1 call + 2 retries reach the server.
    with pytest.raises(openai.RateLimitError):
        ask(judge.client(max_retries=2), judge_messages("p", "r"))
    stats = judge.get("/stats")
    assert stats["requests_total"] == 4
    assert stats["responses_by_status"] == {"429": 4}
    assert stats["faults_injected"] == {"429": 4}
    assert stats["max_ok_per_prompt"] == 0


@pytest.mark.parametrize(("kind", "error", "status"), [
    ("500", openai.InternalServerError, 500),
    ("503", openai.InternalServerError, 503),
    ("400", openai.BadRequestError, 400),
    ("401", openai.AuthenticationError, 401),
])
def test_injected_http_faults_raise_the_sdk_errors(judge: RunningJudge, kind: str,
                                                   error: type[openai.APIStatusError],
                                                   status: int) -> None:
    judge.configure(error_rate=1.0, error_kinds=[kind])
    with pytest.raises(error) as caught:
        ask(judge.client(), judge_messages("p", "r"))
    assert caught.value.status_code == status
    assert judge.get("/stats")["responses_by_status"] == {str(status): 1}


def test_malformed_reply_is_a_200_without_a_score(judge: RunningJudge) -> None:
    judge.configure(error_rate=1.0, error_kinds=["malformed"])
    content = ask(judge.client(), judge_messages("p", "r")).choices[0].message.content or ""
    assert content.strip()
    assert "score" not in content
    assert not any(char.isdigit() for char in content)  # nothing a lenient parser could take
    stats = judge.get("/stats")
    assert stats["responses_by_status"] == {"200": 1}
    assert stats["faults_injected"] == {"malformed": 1}
    assert stats["max_ok_per_prompt"] == 0  # delivered, but nothing was judged


def test_timeout_fault_outlasts_the_client_and_counts_as_gone(judge: RunningJudge) -> None:
    judge.configure(error_rate=1.0, error_kinds=["timeout"], timeout_sleep_s=1.0)
    with pytest.raises(openai.APITimeoutError):
        ask(judge.client(timeout=0.2), judge_messages("p", "r"))
    stats = wait_for_stats(judge, lambda s: s["in_flight"] == 0)
    assert stats["faults_injected"] == {"timeout": 1}
    assert stats["responses_by_status"] == {"499": 1}
    assert stats["max_ok_per_prompt"] == 0


def test_rpm_limit_refuses_beyond_the_window(judge: RunningJudge) -> None:
    judge.configure(rpm_limit=3)
    client = judge.client()
    for i in range(3):
        ask(client, judge_messages(f"p{i}", "r"))
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, judge_messages("p3", "r"))
    headers = caught.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    stats = judge.get("/stats")
    assert stats["responses_by_status"] == {"200": 3, "429": 1}
    assert stats["rpm_rejections"] == 1
    assert stats["faults_injected"] == {}
    judge.configure(rpm_limit=3)  # setting it again starts a fresh window
    ask(client, judge_messages("p4", "r"))


def test_stats_count_prompts_and_concurrency(judge: RunningJudge) -> None:
    client = judge.client()
    for _ in range(3):
        ask(client, judge_messages("repeated", "the answer is 1", "1"))
    ask(client, judge_messages("once", "the answer is 2", "2"))
    judge.configure(latency_ms=200.0)
    asyncio.run(concurrent_calls(judge.base_url, 60))
    stats = judge.get("/stats")
    assert stats["requests_total"] == 64
    assert stats["responses_by_status"] == {"200": 64}
    assert stats["unique_prompts"] == 62
    assert stats["max_requests_per_prompt"] == 3
    assert stats["max_ok_per_prompt"] == 3
    assert stats["max_in_flight"] >= 50
    assert stats["in_flight"] == 0
    assert stats["max_requests_in_any_1s"] >= 50
    assert stats["prompt_tokens_total"] > 64 * 30
    assert stats["completion_tokens_total"] > 64 * 5

    zeroed = judge.post("/stats/reset").json()
    assert zeroed["requests_total"] == 0
    assert zeroed["responses_by_status"] == {}
    assert zeroed["unique_prompts"] == zeroed["max_ok_per_prompt"] == 0
    assert zeroed["max_in_flight"] == zeroed["max_requests_in_any_1s"] == 0


async def concurrent_calls(base_url: str, n: int) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0) as client:
        await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=judge_messages(f"concurrent {i}", "r"))  # type: ignore[arg-type]
            for i in range(n)))


def test_admin_config_changes_behaviour_at_runtime(judge: RunningJudge) -> None:
    assert judge.get("/admin/config") == JudgeConfig().as_dict()
    refused = judge.post("/admin/config", {"error_rate": 2})
    assert refused.status_code == 400
    assert "error_rate" in refused.json()["error"]
    assert judge.get("/admin/config")["error_rate"] == 0.0

    def statuses() -> list[int]:
        client = judge.client()
        codes = []
        for i in range(20):
            try:
                ask(client, judge_messages(f"q{i}", "r"))
                codes.append(200)
            except openai.APIStatusError as exc:
                codes.append(exc.status_code)
        return codes

    judge.configure(error_rate=0.5, error_kinds=["500"], seed=5)
    first = statuses()
    assert judge.configure(seed=5)["error_rate"] == 0.5  # other knobs untouched
    assert statuses() == first
    assert set(first) == {200, 500}
    judge.configure(error_rate=0.0)
    assert ask(judge.client(), judge_messages("after", "r")).choices[0].message.content


def test_refuses_requests_the_api_would_refuse(judge: RunningJudge) -> None:
    url = judge.base_url + "/chat/completions"
    for body in ({"model": MODEL}, {"model": MODEL, "messages": []},
                 {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}):
        response = httpx.post(url, json=body, timeout=10)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(url, content=b"{not json", timeout=10).status_code == 400
    assert httpx.post(url, content=b" " * (5 * 2**20), timeout=10).status_code == 413
    assert judge.get("/stats")["responses_by_status"] == {"400": 4, "413": 1}


def test_logprobs_come_in_the_openai_shape_peaked_at_the_grade(judge: RunningJudge) -> None:
    client = judge.client()
    messages = judge_messages("What is 6 x 7?", "The answer is 48.", "42")
    ask_logprobs: Any = {"model": MODEL, "messages": messages, "logprobs": True}
    completion = client.chat.completions.create(**ask_logprobs, top_logprobs=20)
    content = completion.choices[0].message.content or ""
    tokens = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert tokens is not None and "".join(t.token for t in tokens) == content
    grade = json.loads(content)["score"]
    (at,) = [t for t in tokens if t.logprob != 0.0]  # only the score is uncertain
    assert at.token == str(grade) == at.top_logprobs[0].token  # sampled = most likely
    assert sorted(int(alt.token) for alt in at.top_logprobs) == list(range(1, 11))
    assert [alt.logprob for alt in at.top_logprobs] == sorted(
        (alt.logprob for alt in at.top_logprobs), reverse=True)
    assert math.fsum(math.exp(alt.logprob) for alt in at.top_logprobs) == pytest.approx(1.0)

    again = client.chat.completions.create(**ask_logprobs, top_logprobs=3)
    again_at = [t for t in again.choices[0].logprobs.content or [] if t.logprob != 0.0]  # type: ignore[union-attr]
    assert [alt.token for alt in again_at[0].top_logprobs] == [
        alt.token for alt in at.top_logprobs[:3]]  # deterministic for a request and seed
    judge.configure(seed=1)
    reseeded = client.chat.completions.create(**ask_logprobs, top_logprobs=20)
    assert reseeded.choices[0].logprobs.content != tokens  # type: ignore[union-attr]


def test_an_endpoint_without_logprobs_ignores_the_fields(judge: RunningJudge) -> None:
    messages = judge_messages("What is 6 x 7?", "The answer is 42.", "42")
    plain = ask(judge.client(), messages)
    assert plain.choices[0].logprobs is None  # not asked for
    judge.configure(logprobs=False)
    body: Any = {"model": MODEL, "messages": messages, "logprobs": True, "top_logprobs": 5}
    completion = judge.client().chat.completions.create(**body)
    assert completion.choices[0].logprobs is None
    assert completion.choices[0].message.content == plain.choices[0].message.content


def test_no_logprobs_flag_starts_an_endpoint_without_logprobs() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--no-logprobs"])).logprobs is False
    assert config_from_args(parser.parse_args([])).logprobs is True


def test_refuses_logprob_requests_the_api_would_refuse(judge: RunningJudge) -> None:
    url = judge.base_url + "/chat/completions"
    messages = [{"role": "user", "content": "x"}]
    for extra in ({"top_logprobs": 5}, {"logprobs": True, "top_logprobs": 21},
                  {"logprobs": True, "top_logprobs": "5"}, {"logprobs": "yes"}):
        response = httpx.post(url, json={"model": MODEL, "messages": messages, **extra},
                              timeout=10)
        assert response.status_code == 400, extra
        assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("signum", "loop"), [(signal.SIGTERM, "asyncio"), (signal.SIGINT, "auto")])
def test_cli_flags_and_clean_exit_on_signals(signum: signal.Signals, loop: str) -> None:
    judge = start_judge("--latency-ms", "5", "--jitter-ms", "2", "--error-rate", "0.25",
                        "--error-kinds", "429,timeout", "--rpm-limit", "100", "--seed", "9",
                        "--loop", loop)
    try:
        assert judge.get("/admin/config") == JudgeConfig(
            latency_ms=5, jitter_ms=2, error_rate=0.25, error_kinds=("429", "timeout"),
            rpm_limit=100, seed=9).as_dict()
    finally:
        judge.process.send_signal(signum)
    assert judge.process.wait(timeout=10) == 0


def test_cli_refuses_bad_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "judge_server", "--error-kinds", "418"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "error_kinds" in result.stderr


def test_background_server_in_a_thread() -> None:
    with BackgroundJudgeServer(JudgeConfig(model="judge-x")) as judge:
        assert judge.base_url == f"http://127.0.0.1:{judge.port}/v1"
        client = openai.OpenAI(base_url=judge.base_url, api_key="k", max_retries=0)
        messages = judge_messages("1+1?", "the answer is 2", "2")
        completion = client.chat.completions.create(model="judge-x", messages=messages)  # type: ignore[arg-type]
        assert json.loads(completion.choices[0].message.content or "")["score"] == CORRECT_SCORE
        assert judge.service.stats.snapshot()["responses_by_status"] == {"200": 1}


def wait_for_stats(judge: RunningJudge, ready: Any, within_s: float = 10.0) -> dict[str, Any]:
    """``/stats`` once ``ready(stats)`` holds (the server finishes a stalled request late)."""
    deadline = time.monotonic() + within_s
    while True:
        stats = judge.get("/stats")
        if ready(stats) or time.monotonic() > deadline:
            return dict(stats)
        time.sleep(0.05)
