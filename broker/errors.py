"""rewardq's exception tree.

    RewardqError
     ├── ConfigError            settings or config values that cannot work (permanent)
     ├── InvalidItemError       an item failed validation at an edge (permanent)
     ├── BrokerUnavailableError Redis could not be reached within the deadline
     │    └── RedisFullError    Redis answers but refuses writes: its memory reached
     │                          maxmemory (``OOM command not allowed``)
     ├── ScoringTimeoutError    results did not arrive within the caller's timeout
     ├── NoWorkersError         no live worker consumes the queue the work was sent to
     ├── ChunksLostError        Redis lost queued work (restarted empty) and re-enqueueing
     │                          is off
     ├── DeadLetterNotFound     a dead-letter id that is not (or no longer) recorded
     └── JudgeError             a judge call did not produce a score; ``kind`` says how
          ├── TransientJudgeError   worth retrying: 429, 408/409, 5xx, timeouts, network
          │    └── UnparseableReplyError  no score in the reply (a model sampling at
          │                               temperature > 0 may well answer properly next time)
          ├── PermanentJudgeError   not worth retrying: 400, 401/403
          │    ├── CutReplyError          the reply was cut by its token limit before a
          │    │                          verdict (raise the judge's max tokens)
          │    ├── RefusedParameterError  the endpoint refuses a request parameter
          │    ├── BudgetExceededError    the run's or step's judge budget is spent
          │    └── RubricMismatchError    producer and worker hold different rubrics

Catch ``TransientJudgeError`` apart from ``PermanentJudgeError`` to decide on retries;
read ``JudgeError.kind`` (and ``status_code``) to label what happened.
"""

from __future__ import annotations

import enum


class RewardqError(Exception):
    """Root of every error rewardq raises on purpose."""


class ConfigError(RewardqError, ValueError):
    """A setting or config value that cannot work."""


class InvalidItemError(RewardqError, ValueError):
    """One or more items failed validation; the message names each item and field."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        head = f"{len(problems)} invalid item field(s):\n  " if len(problems) > 1 else ""
        super().__init__(head + "\n  ".join(problems))


class BrokerUnavailableError(RewardqError, ConnectionError):
    """Redis (broker, backend or cache) could not be reached within the deadline."""


class RedisFullError(BrokerUnavailableError):
    """Redis is up but refuses writes: its used memory reached ``maxmemory`` under the
    ``noeviction`` policy (Redis' ``OOM command not allowed``).

    Treated like an outage (retried with backoff, since freeing memory ends it without
    a restart), but named for what it is: raise ``maxmemory`` or free memory.

    Attributes:
        used_bytes: Redis' ``used_memory`` when it was seen full, if it could be read.
        maxmemory_bytes: its ``maxmemory``, if it could be read.
    """

    def __init__(self, message: str, *, used_bytes: int | None = None,
                 maxmemory_bytes: int | None = None) -> None:
        super().__init__(message)
        self.used_bytes = used_bytes
        self.maxmemory_bytes = maxmemory_bytes


class ScoringTimeoutError(RewardqError, TimeoutError):
    """Results did not all arrive within the caller's timeout."""


class NoWorkersError(RewardqError):
    """No live worker consumes the queue the work was sent to (no heartbeat in Redis)."""


class ChunksLostError(RewardqError):
    """Redis lost chunks (no queue entry, no lease, no result) and they were not re-sent."""


class DeadLetterNotFound(RewardqError, KeyError):
    """A dead-letter id that is not recorded (never was, replayed, or expired)."""


class JudgeErrorKind(enum.StrEnum):
    """How a judge call failed (the ``status`` label of its metrics, beside HTTP codes)."""

    HTTP = "http"                #: the judge answered with an error status
    TIMEOUT = "timeout"          #: no answer within the timeout
    NETWORK = "network"          #: no connection, or it broke
    UNPARSEABLE = "unparseable"  #: an answer without a readable score
    CUT = "cut"                  #: an answer cut by its token limit before the verdict
    BUDGET = "budget"            #: not called: the judge budget is spent
    RUBRIC = "rubric"            #: not called: the worker's rubric differs from the producer's
    OTHER = "other"              #: anything else the SDK raised


class JudgeError(RewardqError):
    """A judge call that did not produce a score.

    Attributes:
        kind: how it failed.
        status_code: the HTTP status, when the judge answered with one.
        retry_after_s: the server's ``Retry-After``, when it gave one.
    """

    default_kind = JudgeErrorKind.OTHER

    def __init__(self, message: str, *, kind: JudgeErrorKind | None = None,
                 status_code: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind or (JudgeErrorKind.HTTP if status_code is not None
                             else self.default_kind)
        self.status_code = status_code
        self.retry_after_s = retry_after_s


class TransientJudgeError(JudgeError):
    """Worth retrying: rate limits, timeouts, server and network errors."""


class PermanentJudgeError(JudgeError):
    """Not worth retrying: bad request, auth."""


class UnparseableReplyError(TransientJudgeError):
    """The judge answered, but no score could be read from its reply (retried while
    attempts last)."""

    default_kind = JudgeErrorKind.UNPARSEABLE


class CutReplyError(PermanentJudgeError):
    """The reply was cut by its token limit (``finish_reason: "length"``, or thinking left
    open) before a verdict: never scored, not retried (the same budget cuts it again)."""

    default_kind = JudgeErrorKind.CUT


class RefusedParameterError(PermanentJudgeError):
    """The endpoint answered 400 to a request parameter it does not take (OpenAI's
    ``unsupported_parameter``/``unsupported_value``, or a message naming the parameter).

    Attributes:
        param: the parameter refused, e.g. ``max_tokens``, ``temperature``, ``logprobs``.
    """

    def __init__(self, message: str, *, param: str, status_code: int | None = 400) -> None:
        super().__init__(message, status_code=status_code)
        self.param = param


class BudgetExceededError(PermanentJudgeError):
    """The call was not made: the fleet-wide judge budget (run or step) is spent. Its
    item comes back ``budget_exceeded`` and is dead-lettered for a replay."""

    default_kind = JudgeErrorKind.BUDGET


class RubricMismatchError(PermanentJudgeError):
    """The call was not made: the item's rubric on this worker is not the one the producer
    fingerprinted (another rubrics file or an edited one). Judging with it would cache a
    verdict under the wrong key."""

    default_kind = JudgeErrorKind.RUBRIC
