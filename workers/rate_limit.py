"""The fleet-wide judge rate limiter: requests and tokens per minute, per model, in Redis.

Every worker process shares one limiter state per judge model, so the limit holds for
the fleet however many processes run. The state is GCRA (generic cell rate algorithm) in
its *virtual scheduling* form: one *theoretical arrival time* (TAT) per dimension,
advanced by ``cost * interval`` for every request. Redis server time is the only clock,
so the worker hosts' clocks do not matter.

Reservation, not polling: one atomic Lua call per request computes the earliest time at
which both the request limit (RPM) and the token limit (TPM) admit it, *reserves* that
slot in both streams, and returns how long until it. The caller sleeps until exactly
then and goes; within ``RateLimit.max_late_s`` of its slot it never asks again, so a
waiter that wakes a little late (a busy host, a slow event loop) still owns its slot.

What the judge sees is sends, not slots, and a send lies after its slot by the caller's
lateness. So the judge's margin over the rate has two parts, and any ``w`` seconds at
the judge hold at most ``RateLimit.peak_requests(w)`` = ``rate * (w + burst_s +
max_late_s)`` requests (``burst_s`` counts as at least one interval):

- ``RateLimit.burst_s``: how much of the rate may be *booked* at once (at least one
  request). Any ``w`` seconds of slots hold at most ``rate * (w + burst_s)`` requests
  (``rate * w + 1`` when that is more), whatever the order in which the fleet's calls
  reach Redis;
- ``RateLimit.max_late_s``: how late after its slot a caller may go. One that would go
  later books again (that slot is lost, the only loss the limiter makes). The slot is
  placed on the process's clock by ``RedisClock``, which learns the offset to Redis's
  clock from the fastest round trips, so a reply read late counts towards lateness and
  no caller goes before its slot.

The defaults, 20 ms and 30 ms, give 52 per second at 3,000 RPM (50/s). The price is the
slots of callers woken more than 30 ms late, which book again. The figures measured on
the full stack are in ``benchmarks/RESULTS.md`` (rate limiter) and
``docs/internals.md``.

A process also books only ``RateLimit.horizon_s`` ahead of itself: its waiters queue
locally (FIFO) and book one at a time, each once the process's last booked slot is less
than ``horizon_s`` away. So the fleet's slots interleave across processes instead of one
process holding a block of them (booked at once, a chunk's items would take consecutive
slots that one stalled process then sends together), and a stalled process misses only
the one or two slots it booked last.

A request costing more tokens than the token burst gets a slot once the token stream is
idle (its TAT has reached the slot) and then holds later requests back for its full
cost, so it waits but never deadlocks, and the long-run average stays at the limit.

Whatever slot the fleet has free is booked, however far ahead (a large token cost can
put it minutes out); the caller's own deadline is its business (cancel the wait). A
cancelled wait books nothing while it queues locally, gives a booked slot back when that
is still the last one of the fleet, and otherwise leaves it unused, which only errs below
the limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis
import redis.asyncio

from rewardq.broker.connections import (
    is_outage,
    is_redis_full,
    redis_full_error,
    reply_text,
)
from rewardq.broker.errors import BrokerUnavailableError, ConfigError
from rewardq.broker.keys import rate_limit_key
from rewardq.broker.settings import Settings
from rewardq.judge.messages import message_texts
from rewardq.judge.rollout_view import CHARS_PER_TOKEN

log = logging.getLogger(__name__)

DEFAULT_BURST_S = 0.02
"""Default burst: 20 ms worth of the rate may be booked at once (at least one request)."""

DEFAULT_MAX_LATE_S = 0.03
"""Default: a caller going more than 30 ms after its slot books a new one instead."""

DEFAULT_HORIZON_S = 0.05
"""Default: a process books a new slot once its last one is less than 50 ms away."""

CLOCK_AGING = 0.001
"""How fast a Redis-clock sample loses weight: 1 ms of round trip per second of age
(worse than any clock's drift), so a newer sample replaces it in time."""

TOKENS_PER_MESSAGE = 3
"""Chat-format overhead per message (role, separators) in the token estimate."""

RESERVE_LUA = """
--[[
GCRA reservation of one judge request's slot against a model's request AND token limits.

KEYS[1]  rewardq:rl:<model>:rpm  STRING  TAT of the request stream: Redis server time
                                         in ms, "%.3f"; PX = TAT - now, so the key is
                                         gone as soon as the limiter is idle
KEYS[2]  rewardq:rl:<model>:tpm  STRING  TAT of the token stream; same format and PX
ARGV[1]  ms per request (emission interval); 0 = no request limit, KEYS[1] untouched
ARGV[2]  request burst tolerance, ms
ARGV[3]  ms per token; 0 = no token limit, KEYS[2] untouched
ARGV[4]  token burst tolerance, ms
ARGV[5]  tokens this request costs (>= 0)
ARGV[6]  most ms ahead a slot may be booked; < 0 = any (0: only a slot that is now)

The slot is the earliest time `go` >= now at which each stream admits the request:
max(TAT, go) + cost * interval - go <= max(tolerance, cost * interval). A cost above the
tolerance is admitted once the stream is idle at `go` (TAT <= go). When the slot is within
ARGV[6], both TATs become max(TAT, go) + cost * interval (the slot is booked), else
nothing is written.

Returns {booked (1|0), us from now to the slot (0 = now), Redis time now in us,
         the request stream's new TAT as stored ("" if untouched),
         the token stream's new TAT as stored ("" if untouched)}.
]]
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000

local function stream(key, interval, tolerance, cost)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local inc = interval * cost
  return tat, inc, tat + inc - math.max(tolerance, inc)
end

local function store(key, tat, inc, go)
  local new_tat = string.format('%.3f', math.max(tat, go) + inc)
  local ttl = math.ceil(tonumber(new_tat) - now)
  if ttl > 0 then
    redis.call('SET', key, new_tat, 'PX', ttl)
  else
    redis.call('DEL', key)
  end
  return new_tat
end

local req_interval, tok_interval = tonumber(ARGV[1]), tonumber(ARGV[3])
local go = now
local req_tat, req_inc, tok_tat, tok_inc, earliest
if req_interval > 0 then
  req_tat, req_inc, earliest = stream(KEYS[1], req_interval, tonumber(ARGV[2]), 1)
  go = math.max(go, earliest)
end
if tok_interval > 0 then
  tok_tat, tok_inc, earliest = stream(KEYS[2], tok_interval, tonumber(ARGV[4]),
                                      tonumber(ARGV[5]))
  go = math.max(go, earliest)
end
-- whole microseconds; less than half of one is now (float noise, not a wait)
local wait_us = math.floor((go - now) * 1000 + 0.5)
local horizon = tonumber(ARGV[6])
if horizon >= 0 and wait_us > horizon * 1000 then
  return {0, math.max(1, wait_us), now_us, '', ''}
end
go = now + wait_us / 1000
local req_new, tok_new = '', ''
if req_tat then req_new = store(KEYS[1], req_tat, req_inc, go) end
if tok_tat then tok_new = store(KEYS[2], tok_tat, tok_inc, go) end
return {1, wait_us, now_us, req_new, tok_new}
"""

RELEASE_LUA = """
--[[
Give back a booked slot whose request will not go (its waiter was cancelled).

KEYS[1..2]  as RESERVE_LUA
ARGV[1]  ms the slot added to the request stream (0 = none)
ARGV[2]  the request stream's TAT that the booking stored ("" = none)
ARGV[3]  ms the slot added to the token stream (0 = none)
ARGV[4]  the token stream's TAT that the booking stored ("" = none)

Only a slot that is still the last one booked in a stream (its TAT unchanged since) is
taken back there: anything else would let a later booking share a slot. Returns how
many streams were rolled back.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rolled = 0
for i = 1, 2 do
  local booked = ARGV[2 * i]
  if booked ~= '' and redis.call('GET', KEYS[i]) == booked then
    local tat = tonumber(booked) - tonumber(ARGV[2 * i - 1])
    local ttl = math.ceil(tat - now)
    if ttl > 0 then
      redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', ttl)
    else
      redis.call('DEL', KEYS[i])
    end
    rolled = rolled + 1
  end
end
return rolled
"""

RECONCILE_LUA = """
--[[
Correct a model's token stream once a reply's real usage is known.

KEYS[1]  rewardq:rl:<model>:tpm  STRING  TAT of the token stream: Redis server time
                                         in ms, "%.3f"; PX = TAT - now
ARGV[1]  ms per token
ARGV[2]  token difference, actual - estimated (may be negative)

Moves the TAT by difference * ms-per-token, never below now (an idle stream has no
credit to give back); deletes the key when the TAT lands on now. Slots booked before
keep their times (a debt paid back only lets later bookings come sooner). Returns the
new backlog (TAT - now) in whole ms.
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
        burst_s: how many seconds' worth of each rate may be booked at once (at least
            one request, or one request's tokens however many). Any window of ``w``
            seconds holds the slots of at most ``rate * (w + burst_s)`` requests (at
            least ``rate * w + 1``).
        max_late_s: a waiter that would go more than this after its slot books a new
            one instead (that slot is lost). Sends therefore lie within ``max_late_s``
            after their slots, and any ``w`` seconds at the judge hold at most
            :meth:`peak_requests` of them: the judge's margin over the rate is
            ``burst_s + max_late_s``. A late wake-up within it loses nothing.
        horizon_s: a process books a new slot only once its last booked slot is less
            than this far ahead (its other waiters queue locally), so the fleet's slots
            interleave across processes and a stalled process holds few of them.

    Raises:
        ConfigError: a limit that is not a positive integer, or a negative or
            non-finite ``burst_s``, ``max_late_s`` or ``horizon_s``.
    """

    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = DEFAULT_BURST_S
    max_late_s: float = DEFAULT_MAX_LATE_S
    horizon_s: float = DEFAULT_HORIZON_S

    def __post_init__(self) -> None:
        for name, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and (isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        for name, seconds in (("burst_s", self.burst_s), ("max_late_s", self.max_late_s),
                              ("horizon_s", self.horizon_s)):
            if not math.isfinite(seconds) or seconds < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {seconds!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimit:
        """The limit configured by ``REWARDQ_JUDGE_RPM`` / ``REWARDQ_JUDGE_TPM``."""
        return cls(rpm=settings.judge_rpm, tpm=settings.judge_tpm)

    @property
    def unlimited(self) -> bool:
        """True when neither requests nor tokens are limited (Redis is never asked)."""
        return self.rpm is None and self.tpm is None

    def peak_requests(self, window_s: float = 1.0) -> int | None:
        """Most requests that callers going within ``max_late_s`` of their slots send in
        any ``window_s`` seconds: ``floor(rate * (window_s + max(burst_s, 1 / rate) +
        max_late_s))``; ``None`` without a request limit.

        Sends in a window lie at slots in that window widened by ``max_late_s``, and the
        booked slots of any ``w`` seconds number at most ``rate * (w + burst_s)``, or
        ``rate * w + 1`` when one interval is more than the burst.
        """
        if self.rpm is None:
            return None
        rate = self.rpm / 60
        return math.floor(rate * (window_s + max(self.burst_s, 1 / rate) + self.max_late_s)
                          + 1e-9)

    def reserve_args(self, tokens: int, max_wait_s: float | None = None) -> list[float]:
        """``ARGV`` of :data:`RESERVE_LUA` for one request costing ``tokens``.

        Args:
            tokens: the request's estimated token cost (ignored without a token limit).
            max_wait_s: book the slot only if it is at most this far ahead; ``None``:
                however far.
        """
        burst_ms = self.burst_s * 1000.0
        horizon_ms = -1.0 if max_wait_s is None else max_wait_s * 1000.0
        return [_ms_per_unit(self.rpm), burst_ms, _ms_per_unit(self.tpm), burst_ms,
                float(tokens), horizon_ms]


def _ms_per_unit(per_minute: int | None) -> float:
    """GCRA emission interval in ms for a per-minute rate; 0.0 means unlimited."""
    return 60_000.0 / per_minute if per_minute else 0.0



@dataclass(frozen=True, slots=True)
class Reservation:
    """One answer of :data:`RESERVE_LUA`.

    Attributes:
        booked: the slot is this request's (else nothing was written).
        wait_s: seconds from Redis's ``now`` to the slot (0.0: now).
        now_us: Redis server time of the decision, in microseconds.
        tokens: the token cost the slot was booked for.
        request_tat: the request stream's TAT as this booking stored it ("" if none).
        token_tat: the token stream's TAT as this booking stored it ("" if none).
    """

    booked: bool
    wait_s: float
    now_us: int
    tokens: int = 0
    request_tat: str = ""
    token_tat: str = ""

    @property
    def slot_us(self) -> int:
        """The slot in Redis server time, microseconds."""
        return self.now_us + round(self.wait_s * 1_000_000)


class RedisClock:
    """Redis server time on this process's loop clock, learnt from the limiter's calls.

    A reply's Redis ``now`` lies between the moment its call was sent and the moment
    the reply was read. The call with the shortest round trip pins the offset between
    the two clocks best (NTP's rule), to within half that round trip; a sample ages by
    :data:`CLOCK_AGING`, so newer ones replace it as the clocks drift apart. No I/O.
    """

    def __init__(self) -> None:
        self._offset = 0.0  # Redis time - loop time, seconds
        self._rtt = math.inf
        self._at = 0.0

    def observe(self, sent: float, read: float, redis_now: float) -> None:
        """One call: sent and its reply read at these loop times; Redis said ``now``."""
        rtt = read - sent
        if rtt <= self._rtt + (sent - self._at) * CLOCK_AGING:
            self._offset, self._rtt, self._at = redis_now - (sent + read) / 2, rtt, sent

    def window(self, redis_time: float, now: float) -> tuple[float, float]:
        """The loop times between which ``redis_time`` falls (``now``: the loop time)."""
        error = (self._rtt + (now - self._at) * CLOCK_AGING) / 2
        centre = redis_time - self._offset
        return centre - error, centre + error


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`RedisRateLimiter.admit` did for one request.

    Attributes:
        waited_s: seconds spent in the limiter.
        slot_us: the slot the caller went for, in Redis server time (us); 0 unlimited.
        late_s: how long after that slot the caller went, at most (counted from the
            earliest loop time the slot can be at); never above ``RateLimit.max_late_s``.
        bookings: script calls made (more than 1: a slot was missed, booked again).
    """

    waited_s: float
    slot_us: int
    late_s: float
    bookings: int


class RedisRateLimiter:
    """Books each judge request's slot in the fleet-wide limit and waits for it.

    Args:
        redis_client: an asyncio Redis client (any ``decode_responses``) on the
            event loop that calls this limiter.
        model: the judge model; the limiter state is shared by every process that
            uses the same model name on the same Redis.
        limit: the model's limits; every process should use the same ones.
    """

    def __init__(self, redis_client: redis.asyncio.Redis, model: str,
                 limit: RateLimit) -> None:
        self.model = model
        self.limit = limit
        self._keys = [rate_limit_key(model, "rpm"), rate_limit_key(model, "tpm")]
        self._reserve = redis_client.register_script(RESERVE_LUA)
        self._release = redis_client.register_script(RELEASE_LUA)
        self._reconcile = redis_client.register_script(RECONCILE_LUA)
        # Slot give-backs of cancelled waiters still running (strong references).
        self._releasing: set[asyncio.Task[None]] = set()
        # This process's waiters book one at a time (FIFO), within the horizon of
        # ``_last_slot``: the loop time of the latest slot booked here.
        self._booking = asyncio.Lock()
        self._last_slot = -math.inf
        self._clock = RedisClock()

    def _outage(self, exc: Exception) -> BrokerUnavailableError:
        if is_redis_full(exc):
            return redis_full_error(f"rate limiter for {self.model!r}", exc)
        return BrokerUnavailableError(f"rate limiter for {self.model!r}: {exc}")

    async def reserve(self, tokens: int, max_wait_s: float | None = None) -> Reservation:
        """One atomic Redis call: book the request's slot, or say how far away it is.

        Args:
            tokens: the request's estimated token cost (see :func:`estimate_tokens`).
            max_wait_s: book only a slot at most this many seconds ahead (0: only one
                that is now); ``None``: however far ahead.

        Returns:
            The answer; with limits off, a booked slot that is now (Redis not asked).

        Raises:
            ValueError: ``tokens`` is negative.
            BrokerUnavailableError: Redis could not be reached.
        """
        _check_tokens(tokens)
        if self.limit.unlimited:
            return Reservation(booked=True, wait_s=0.0, now_us=0, tokens=tokens)
        try:
            booked, wait_us, now_us, request_tat, token_tat = await self._reserve(
                keys=self._keys, args=self.limit.reserve_args(tokens, max_wait_s))
        except redis.RedisError as exc:
            if not is_outage(exc):
                raise
            raise self._outage(exc) from exc
        return Reservation(booked=bool(booked), wait_s=int(wait_us) / 1_000_000,
                           now_us=int(now_us), tokens=tokens,
                           request_tat=reply_text(request_tat),
                           token_tat=reply_text(token_tat))

    async def try_acquire(self, tokens: int) -> float:
        """Ask once, without waiting: admit the request now or say how long to wait.

        Args:
            tokens: the request's estimated token cost (see :func:`estimate_tokens`).

        Returns:
            0.0 when admitted (and recorded), else seconds until its slot would be
            (nothing recorded).

        Raises:
            ValueError: ``tokens`` is negative.
            BrokerUnavailableError: Redis could not be reached.
        """
        answer = await self.reserve(tokens, max_wait_s=0.0)
        return 0.0 if answer.booked else answer.wait_s

    async def acquire(self, tokens: int) -> float:
        """Book the request's slot and sleep until it; a limit hit is never an error.

        :meth:`admit`, returning only the seconds spent (what the judge client counts).

        Raises:
            ValueError: ``tokens`` is negative.
            BrokerUnavailableError: Redis could not be reached.
        """
        return (await self.admit(tokens)).waited_s

    async def admit(self, tokens: int) -> Admission:
        """Book the request's slot and sleep until it; a limit hit is never an error.

        One Redis call per request: the caller queues behind this process's other
        waiters until the process's last booked slot is within ``limit.horizon_s``,
        books the next free slot of the fleet (however far ahead that is), and goes at
        it (or, woken late, as soon as it runs). A caller that would go more than
        ``limit.max_late_s`` after its slot books again. The slot is placed on the loop's
        clock by :class:`RedisClock` (to about half the fastest round trip to Redis) or,
        where that is tighter, by the booking's own round trip: the caller never goes
        before its slot, and a reply read late counts towards its lateness. Cancel it
        (or wrap it in a timeout) to give up: nothing is booked while it queues, and a
        booked slot that is still the last one of the fleet is given back.

        Args:
            tokens: the request's estimated token cost (see :func:`estimate_tokens`);
                correct it with :meth:`reconcile` once the reply's usage is known.

        Returns:
            The admission (with limits off: waited 0.0, no slot, no booking).

        Raises:
            ValueError: ``tokens`` is negative.
            BrokerUnavailableError: Redis could not be reached.
        """
        _check_tokens(tokens)
        if self.limit.unlimited:
            return Admission(waited_s=0.0, slot_us=0, late_s=0.0, bookings=0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        bookings = 0
        while True:
            async with self._booking:
                ahead_s = self._last_slot - loop.time() - self.limit.horizon_s
                if ahead_s > 0:
                    await asyncio.sleep(ahead_s)
                asked = loop.time()
                answer = await self.reserve(tokens)
                read = loop.time()
                bookings += 1
                # The slot lies between asked + wait and read + wait (Redis's `now` lies
                # between the call and its reply), and within the clock's window of it:
                # go at the earliest time sure to be no earlier than the slot, and count
                # lateness from the latest time sure to be no later.
                self._clock.observe(asked, read, answer.now_us / 1_000_000)
                earliest, latest = self._clock.window(answer.slot_us / 1_000_000, read)
                slot_from = max(asked + answer.wait_s, earliest)
                go_at = min(read + answer.wait_s, latest)
                self._last_slot = max(self._last_slot, go_at)
            if go_at > loop.time():
                try:
                    await asyncio.sleep(go_at - loop.time())
                except asyncio.CancelledError:
                    self._give_back(answer)
                    raise
            now = loop.time()
            late_s = now - slot_from
            if late_s <= self.limit.max_late_s:
                return Admission(waited_s=now - started, slot_us=answer.slot_us,
                                 late_s=late_s, bookings=bookings)
            log.debug("rate limiter for %r: %.3f s after the slot; booking another",
                      self.model, late_s)

    def _give_back(self, answer: Reservation) -> None:
        """Release a cancelled waiter's slot in the background (never raises)."""
        task = asyncio.get_running_loop().create_task(self._release_slot(answer))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_slot(self, answer: Reservation) -> None:
        args: list[float | str] = [
            _ms_per_unit(self.limit.rpm) if answer.request_tat else 0.0,
            answer.request_tat,
            _ms_per_unit(self.limit.tpm) * answer.tokens if answer.token_tat else 0.0,
            answer.token_tat]
        try:
            await self._release(keys=self._keys, args=args)
        except (redis.RedisError, OSError) as exc:  # the slot just stays unused
            log.debug("rate limiter for %r: slot not given back (%s)", self.model, exc)

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
        except redis.RedisError as exc:
            if not is_outage(exc):
                raise
            raise self._outage(exc) from exc


def _check_tokens(tokens: int) -> None:
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")


def estimate_tokens(messages: Sequence[Mapping[str, object]], max_tokens: int) -> int:
    """Tokens a chat-completions call may cost, before the call: to debit the limit.

    Counts one token per 4 characters of message text (``rewardq.judge.messages``,
    rounded up), 3 tokens of chat-format overhead per message, and the whole
    ``max_tokens`` for the reply (what the API itself reserves).
    :meth:`RedisRateLimiter.reconcile` corrects the estimate.

    Args:
        messages: OpenAI chat messages; ``content`` is a string, ``None``, or a list of
            parts whose ``text`` fields count.
        max_tokens: the call's ``max_tokens``.

    Raises:
        ValueError: ``max_tokens`` is negative.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    chars = sum(len(text) for message in messages for text in message_texts(message))
    return -(-chars // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages) + max_tokens
