"""The fleet-wide judge rate limiter: requests and tokens per minute, per model, in Redis.

Every worker process shares one limiter state per judge model, so the limit holds for
the fleet however many processes run. The state is GCRA (generic cell rate algorithm):
one *theoretical arrival time* (TAT) per dimension, advanced by ``cost * interval``
for every admitted request. One atomic Lua call checks the request limit (RPM) and
the token limit (TPM) together and records the request in both only when both admit
it, so a request that the token limit refuses never uses request capacity. Redis
server time is the only clock, so the worker hosts' clocks do not matter.

Burst: ``RateLimit.burst_s`` seconds' worth of the rate may go at once (at least one
request). The default, 0.05 s, keeps any 1 s window at or below ``rate + 2.5``
requests: at 3,000 RPM (50/s) that is 52, under the judge's limit of 55, while
leaving enough slack (30 ms) that a slightly late waiter does not lose throughput.

A request costing more tokens than the token burst is admitted once the token stream
is idle (its TAT has reached now) and then holds later requests back for its full
cost, so it waits but never deadlocks, and the long-run average stays at the limit.

One :class:`RedisRateLimiter` belongs to one event loop (the worker process's loop):
its callers queue on a local FIFO lock and only the head of that queue asks Redis,
so a thousand waiting coroutines cost one Redis call per wake-up, not a thousand.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
import redis.asyncio

from broker.errors import BrokerUnavailableError, ConfigError
from broker.keys import rate_limit_key
from broker.settings import Settings

DEFAULT_BURST_S = 0.05
"""Default burst: 50 ms worth of the rate (at least one request)."""

MAX_JITTER_S = 0.002
"""Upper bound of the random delay added to a wait, so waiting processes desynchronise."""

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3
"""Chat-format overhead per message (role, separators) in the token estimate."""

ADMIT_LUA = """
--[[
GCRA admission of one judge request against a model's request AND token limits.

KEYS[1]  rewardq:rl:<model>:rpm  STRING  TAT of the request stream: Redis server time
                                         in ms, "%.3f"; PX = TAT - now, so the key is
                                         gone as soon as the limiter is idle
KEYS[2]  rewardq:rl:<model>:tpm  STRING  TAT of the token stream; same format and PX
ARGV[1]  ms per request (emission interval); 0 = no request limit, KEYS[1] untouched
ARGV[2]  request burst tolerance, ms
ARGV[3]  ms per token; 0 = no token limit, KEYS[2] untouched
ARGV[4]  token burst tolerance, ms
ARGV[5]  tokens this request costs (>= 0)

Returns 0 when admitted (both TATs advanced) or the whole ms to wait before retrying
(>= 1; nothing written). A request is admitted when new_tat - now <= max(tolerance,
cost): a cost above the tolerance is admitted once the stream is idle (TAT <= now).
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

-- new TAT if this stream admits the request, else nil and the ms until it would
local function step(key, interval, tolerance, cost)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local inc = interval * cost
  local new_tat = tat + inc
  local allow_at = new_tat - math.max(tolerance, inc)
  if allow_at > now then return nil, allow_at - now end
  return new_tat, 0
end

local function store(key, new_tat)
  local ttl = math.ceil(new_tat - now)
  if ttl > 0 then
    redis.call('SET', key, string.format('%.3f', new_tat), 'PX', ttl)
  else
    redis.call('DEL', key)
  end
end

local req_interval, tok_interval = tonumber(ARGV[1]), tonumber(ARGV[3])
local req_tat, tok_tat
local wait = 0
if req_interval > 0 then
  local w
  req_tat, w = step(KEYS[1], req_interval, tonumber(ARGV[2]), 1)
  wait = math.max(wait, w)
end
if tok_interval > 0 then
  local w
  tok_tat, w = step(KEYS[2], tok_interval, tonumber(ARGV[4]), tonumber(ARGV[5]))
  wait = math.max(wait, w)
end
if wait > 0 then return math.max(1, math.ceil(wait)) end
if req_tat then store(KEYS[1], req_tat) end
if tok_tat then store(KEYS[2], tok_tat) end
return 0
"""

RECONCILE_LUA = """
--[[
Correct a model's token stream once a reply's real usage is known.

KEYS[1]  rewardq:rl:<model>:tpm  STRING  TAT of the token stream: Redis server time
                                         in ms, "%.3f"; PX = TAT - now
ARGV[1]  ms per token
ARGV[2]  token difference, actual - estimated (may be negative)

Moves the TAT by difference * ms-per-token, never below now (an idle stream has no
credit to give back); deletes the key when the TAT lands on now. Returns the new
backlog (TAT - now) in whole ms.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = math.max(now, tat + tonumber(ARGV[1]) * tonumber(ARGV[2]))
local ttl = math.ceil(new_tat - now)
if ttl > 0 then
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', ttl)
else
  redis.call('DEL', KEYS[1])
end
return ttl
"""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A judge model's fleet-wide limits.

    Args:
        rpm: requests per minute; ``None`` = no request limit.
        tpm: tokens per minute; ``None`` = no token limit.
        burst_s: how many seconds' worth of each rate may go at once (at least one
            request, or one request's tokens however many). Any window of ``w`` seconds
            admits at most ``rate * (w + burst_s)`` requests (at least ``rate * w + 1``).

    Raises:
        ConfigError: a limit that is not a positive integer, or a negative or
            non-finite ``burst_s``.
    """

    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = DEFAULT_BURST_S

    def __post_init__(self) -> None:
        for name, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if not math.isfinite(self.burst_s) or self.burst_s < 0:
            raise ConfigError(f"burst_s must be a finite number >= 0, got {self.burst_s!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimit:
        """The limit configured by ``REWARDQ_JUDGE_RPM`` / ``REWARDQ_JUDGE_TPM``."""
        return cls(rpm=settings.judge_rpm, tpm=settings.judge_tpm)

    @property
    def unlimited(self) -> bool:
        """True when neither requests nor tokens are limited (Redis is never asked)."""
        return self.rpm is None and self.tpm is None

    def admit_args(self, tokens: int) -> list[float]:
        """``ARGV`` of :data:`ADMIT_LUA` for one request costing ``tokens``.

        Args:
            tokens: the request's estimated token cost (ignored without a token limit).
        """
        burst_ms = self.burst_s * 1000.0
        return [_ms_per_unit(self.rpm), burst_ms, _ms_per_unit(self.tpm), burst_ms,
                float(tokens)]


def _ms_per_unit(per_minute: int | None) -> float:
    """GCRA emission interval in ms for a per-minute rate; 0.0 means unlimited."""
    return 60_000.0 / per_minute if per_minute else 0.0


class RedisRateLimiter:
    """Waits until a judge request for ``model`` fits the fleet-wide limit.

    Args:
        redis_client: an asyncio Redis client (any ``decode_responses``) on the
            event loop that calls this limiter.
        model: the judge model; the limiter state is shared by every process that
            uses the same model name on the same Redis.
        limit: the model's limits; every process should use the same ones.
        rng: source of the wake-up jitter (a seeded one makes tests repeatable).
    """

    def __init__(self, redis_client: redis.asyncio.Redis, model: str, limit: RateLimit,
                 *, rng: random.Random | None = None) -> None:
        self.model = model
        self.limit = limit
        self._keys = [rate_limit_key(model, "rpm"), rate_limit_key(model, "tpm")]
        self._admit = redis_client.register_script(ADMIT_LUA)
        self._reconcile = redis_client.register_script(RECONCILE_LUA)
        self._rng = rng or random.Random()
        # FIFO queue of this process's waiters: only its head polls Redis.
        self._turn = asyncio.Lock()

    async def try_acquire(self, tokens: int) -> float:
        """Ask once, without waiting: admit the request now or say how long to wait.

        Args:
            tokens: the request's estimated token cost (see :func:`estimate_tokens`).

        Returns:
            0.0 when admitted (and recorded), else seconds to wait before asking again.

        Raises:
            ValueError: ``tokens`` is negative.
            BrokerUnavailableError: Redis could not be reached.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self.limit.unlimited:
            return 0.0
        try:
            wait_ms = await self._admit(keys=self._keys, args=self.limit.admit_args(tokens))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailableError(f"rate limiter for {self.model!r}: {exc}") from exc
        return int(wait_ms) / 1000.0

    async def acquire(self, tokens: int) -> float:
        """Wait until the request is admitted; a limit hit is never an error.

        Sleeps the wait Redis names (plus up to 2 ms of jitter) between attempts, so a
        waiter costs one Redis call per wake-up. Cancel it (or wrap it in a timeout) to
        give up.

        Args:
            tokens: the request's estimated token cost (see :func:`estimate_tokens`);
                correct it with :meth:`reconcile` once the reply's usage is known.

        Returns:
            Seconds spent waiting (0.0 without limits).

        Raises:
            ValueError: ``tokens`` is negative.
            BrokerUnavailableError: Redis could not be reached.
        """
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self.limit.unlimited:
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with self._turn:
            while (wait_s := await self.try_acquire(tokens)) > 0:
                jitter = self._rng.uniform(0.0, min(MAX_JITTER_S, wait_s * 0.05))
                await asyncio.sleep(wait_s + jitter)
        return loop.time() - started

    async def reconcile(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Charge the token limit for what a reply really used instead of the estimate.

        Moves the token stream forward (used more) or back (used less), never below
        now. Does nothing without a token limit or when the two agree.

        Args:
            estimated_tokens: the cost passed to :meth:`acquire`.
            actual_tokens: the reply's ``usage.total_tokens``.

        Raises:
            ValueError: either count is negative.
            BrokerUnavailableError: Redis could not be reached.
        """
        if estimated_tokens < 0 or actual_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got {estimated_tokens} and {actual_tokens}")
        if self.limit.tpm is None or estimated_tokens == actual_tokens:
            return
        args = [_ms_per_unit(self.limit.tpm), actual_tokens - estimated_tokens]
        try:
            await self._reconcile(keys=self._keys[1:], args=args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailableError(f"rate limiter for {self.model!r}: {exc}") from exc


def estimate_tokens(messages: Sequence[Mapping[str, object]], max_tokens: int) -> int:
    """Tokens a chat-completions call may cost, before the call: to debit the limit.

    Counts one token per 4 characters of message text (rounded up), 3 tokens of
    chat-format overhead per message, and the whole ``max_tokens`` for the reply (what
    the API itself reserves). :meth:`RedisRateLimiter.reconcile` corrects the estimate.

    Args:
        messages: OpenAI chat messages; ``content`` is a string, ``None``, or a list of
            parts whose ``text`` fields count.
        max_tokens: the call's ``max_tokens``.

    Raises:
        ValueError: ``max_tokens`` is negative.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, Sequence):
            for part in content:
                text = part.get("text") if isinstance(part, Mapping) else None
                if isinstance(text, str):
                    chars += len(text)
    return -(-chars // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + max_tokens
