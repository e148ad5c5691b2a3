"""The retry decision (``rewardq.workers.retry``) and the judge-error classification it relies on.

Both are pure: no I/O, no clock. ``decide`` gets a seeded or fixed random source, so the
backoff sequence is checked exactly.
"""

from __future__ import annotations

import random

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewardq.broker.connections import outage_delay
from rewardq.broker.errors import (
    JudgeError,
    PermanentJudgeError,
    TransientJudgeError,
    UnparseableReplyError,
)
from rewardq.judge.verdicts import classify
from rewardq.workers.retry import RetryDecision, RetryPolicy, decide

POLICY = RetryPolicy(max_attempts=5, base_delay_s=0.1, max_delay_s=1.0)
_REQUEST = httpx.Request("POST", "http://judge.test/v1/chat/completions")


class Ceiling(random.Random):
    """A random source whose ``uniform(a, b)`` is always ``b``: the largest jittered delay."""

    def uniform(self, a: float, b: float) -> float:
        return b


def transient(status: int | None = 500, retry_after: float | None = None) -> TransientJudgeError:
    """A transient judge error as ``classify`` builds it."""
    return TransientJudgeError(f"HTTP {status}", status_code=status, retry_after_s=retry_after)


def status_error(status: int, headers: dict[str, str] | None = None) -> openai.APIStatusError:
    """The SDK's error for an HTTP ``status`` answer."""
    response = httpx.Response(status, headers=headers or {}, request=_REQUEST,
                              json={"error": {"message": f"status {status}"}})
    return openai.APIStatusError(f"status {status}", response=response, body=None)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_http_errors_fail_at_once(status: int) -> None:
    error = classify(status_error(status))

    decision = decide(POLICY, error, attempt=1, remaining_s=60)

    assert isinstance(error, PermanentJudgeError) and error.status_code == status
    assert decision == RetryDecision(False, 0.0, f"permanent: {error}")


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_transient_http_errors_are_retried(status: int) -> None:
    error = classify(status_error(status))

    decision = decide(POLICY, error, attempt=1, remaining_s=60, rng=random.Random(1))

    assert isinstance(error, TransientJudgeError) and error.status_code == status
    assert decision.retry and 0.0 <= decision.delay_s <= POLICY.base_delay_s
    assert decision.reason.startswith("transient")


def test_timeouts_and_connection_errors_are_transient() -> None:
    timeout = classify(openai.APITimeoutError(request=_REQUEST))
    refused = classify(openai.APIConnectionError(request=_REQUEST))

    assert isinstance(timeout, TransientJudgeError) and "timed out" in str(timeout)
    assert isinstance(refused, TransientJudgeError) and "unreachable" in str(refused)
    assert decide(POLICY, timeout, 1, 60).retry and decide(POLICY, refused, 1, 60).retry


@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after": "2"}, 2.0),
    ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise one wins
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # dates are not honoured
    ({}, None),
])
def test_retry_after_is_read_from_the_answer(headers: dict[str, str],
                                             expected: float | None) -> None:
    error = classify(status_error(429, headers))

    assert error.retry_after_s == expected


def test_backoff_doubles_per_attempt_up_to_the_cap() -> None:
    delays = [decide(POLICY, transient(), attempt, remaining_s=60, rng=Ceiling()).delay_s
              for attempt in range(1, 5)]

    assert delays == [0.1, 0.2, 0.4, 0.8]
    capped = RetryPolicy(max_attempts=20, base_delay_s=0.1, max_delay_s=1.0)
    assert decide(capped, transient(), 12, remaining_s=60, rng=Ceiling()).delay_s == 1.0


def test_jitter_spreads_delays_over_the_whole_backoff() -> None:
    rng = random.Random(7)
    delays = [decide(POLICY, transient(), 3, remaining_s=60, rng=rng).delay_s
              for _ in range(200)]

    assert all(0.0 <= d <= 0.4 for d in delays)
    assert min(delays) < 0.1 and max(delays) > 0.3  # full jitter, not a fixed step


def test_retry_after_sets_a_floor_under_the_jitter() -> None:
    decision = decide(POLICY, transient(429, retry_after=3.0), 1, remaining_s=60,
                      rng=random.Random(0))

    assert decision.retry and decision.delay_s == 3.0


def test_no_retry_whose_wait_would_pass_the_deadline() -> None:
    late = decide(POLICY, transient(429, retry_after=5.0), 1, remaining_s=4.9)
    in_time = decide(POLICY, transient(429, retry_after=5.0), 1, remaining_s=5.1)

    assert not late.retry and "deadline" in late.reason
    assert in_time.retry and in_time.delay_s == 5.0


def test_attempts_run_out() -> None:
    last = decide(POLICY, transient(), attempt=POLICY.max_attempts, remaining_s=60)
    before = decide(POLICY, transient(), attempt=POLICY.max_attempts - 1, remaining_s=60)

    assert before.retry
    assert not last.retry and last.reason.startswith("gave up after 5 attempts")


def test_unparseable_replies_are_retried_while_attempts_last() -> None:
    error = UnparseableReplyError("no score in judge reply: 'I cannot grade this.'")

    tries = [decide(POLICY, error, attempt, remaining_s=60).retry
             for attempt in range(1, POLICY.max_attempts + 1)]

    assert tries == [True, True, True, True, False]


_errors = st.one_of(
    st.builds(transient, st.sampled_from([408, 409, 429, 500, 503, None]),
              st.one_of(st.none(), st.floats(0, 1e6))),
    st.builds(lambda s: PermanentJudgeError("x", status_code=s), st.sampled_from([400, 401, 403])),
    st.just(UnparseableReplyError("no score")),
)


@given(error=_errors, attempt=st.integers(1, 10_000), remaining=st.floats(-10, 1e7),
       max_attempts=st.integers(1, 10_000), seed=st.integers(0, 2**32))
def test_decisions_always_respect_attempts_deadline_and_error_kind(
        error: JudgeError, attempt: int, remaining: float, max_attempts: int,
        seed: int) -> None:
    policy = RetryPolicy(max_attempts=max_attempts, base_delay_s=0.1, max_delay_s=10.0)

    decision = decide(policy, error, attempt, remaining, rng=random.Random(seed))

    if decision.retry:
        assert not isinstance(error, PermanentJudgeError) or isinstance(
            error, UnparseableReplyError)
        assert attempt < max_attempts
        assert 0.0 <= decision.delay_s < remaining
        assert decision.delay_s <= max(10.0, error.retry_after_s or 0.0)
    else:
        assert decision.delay_s == 0.0 and decision.reason


def test_outage_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(3)
    first = [outage_delay(1, rng=rng) for _ in range(100)]
    late = [outage_delay(40, rng=rng) for _ in range(100)]

    assert all(0.125 <= d <= 0.25 for d in first)
    assert all(2.5 <= d <= 5.0 for d in late) and len(set(late)) > 1
    assert outage_delay(3, rng=Ceiling()) == 1.0
