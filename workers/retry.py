"""When to retry a judge call: a pure decision, applied by the scorer.

One layer retries: the ``openai`` SDK is built with ``max_retries=0`` so its own retries
never multiply with these. Transient errors back off exponentially with full jitter,
honouring the server's ``Retry-After`` when it gives one; permanent errors fail at
once, except an unparseable reply, which is retried while attempts remain (a model
sampling at temperature > 0, or a glitching proxy, may well answer properly next time).

Redis outages are not decided here: ``rewardq.broker.connections`` holds the one outage policy
(``OUTAGE_ERRORS``, ``with_outage_retries``) that the task, the producer and the dead
letters share.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rewardq.broker.errors import JudgeError, TransientJudgeError, UnparseableReplyError


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one judge call.

    Attributes:
        max_attempts: total attempts, the first included.
        base_delay_s: backoff before the second attempt (doubles each time).
        max_delay_s: cap on one backoff.
    """

    max_attempts: int = 5
    base_delay_s: float = 0.1
    max_delay_s: float = 10.0


@dataclass(frozen=True)
class RetryDecision:
    """Whether to try again, after how long, and why (for logs and dead letters)."""

    retry: bool
    delay_s: float
    reason: str


def decide(policy: RetryPolicy, error: JudgeError, attempt: int, remaining_s: float,
           rng: random.Random | None = None) -> RetryDecision:
    """Decide whether attempt number ``attempt`` (1-based), which raised ``error``, is retried.

    Args:
        policy: the attempt limit and backoff.
        error: what the attempt raised.
        attempt: how many attempts have been made so far.
        remaining_s: seconds left before the item's deadline.
        rng: randomness for jitter (tests pass a seeded one).
    """
    retryable = isinstance(error, TransientJudgeError | UnparseableReplyError)
    if not retryable:
        return RetryDecision(False, 0.0, f"permanent: {error}")
    if attempt >= policy.max_attempts:
        return RetryDecision(False, 0.0, f"gave up after {attempt} attempts: {error}")
    # Capped exponent: 2.0 ** 1100 overflows, and the cap is reached long before.
    backoff = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(attempt - 1, 60))
    delay = (rng or random).uniform(0.0, backoff)
    if error.retry_after_s is not None:
        delay = max(delay, error.retry_after_s)
    if delay >= remaining_s:
        return RetryDecision(False, 0.0, f"deadline leaves no time to retry: {error}")
    return RetryDecision(True, delay, f"transient: {error}")

