"""The fleet-wide judge budget: US dollars per run and per training step, held in Redis.

Every judge call that has a price (``monitoring.costs.PriceTable``) is gated here, in
``JudgeClient.complete``, after the rate limiter admitted it:

1. **reserve** the call's worst case before it is made: the prompt's UTF-8 bytes (a token
   is at least one byte for the byte-level BPE tokenizers providers bill by) plus the
   chat format's per-message tokens, and ``max_tokens`` for the reply, priced for the
   call's model. One atomic Lua call admits it only if ``spent + reserved + worst case``
   stays within the run's limit and within the step's limit; otherwise the call is not
   made and :class:`~broker.errors.BudgetExceededError` is raised (the item comes back
   ``budget_exceeded`` and is dead-lettered for a replay);
2. **settle** it once the reply is read: its reservation leaves ``reserved`` and what the
   reply's ``usage`` really cost is added to ``spent`` (a reply without usage is charged
   its worst case); a call that failed or was cancelled releases its reservation.

Bound: the worst case is an upper bound of what a call can be billed, so ``spent`` never
exceeds the limit however many calls are in flight fleet-wide. The calls in flight only
make the fleet stop *early*: a call is refused when the limit minus ``spent`` is less
than its worst case plus the worst cases in flight, so a run that was refused ends with
less than (W + 1) worst cases unspent, W being the calls that can be in flight at once
(worker processes x ``max_concurrent_requests``). ``spent`` can pass the limit only if a
provider bills more tokens than the worst case (image parts, which are not counted, or a
tokenizer emitting more tokens than bytes).

A reservation whose call never settles (the worker was killed or lost Redis mid-call, or
the reply was no chat completion at all) is a *hold* with an expiry (every endpoint's
timeout plus a minute); the next reserve anywhere in the fleet charges it in full (the
provider may have billed it) and frees it, so a dead worker cannot shrink the budget
forever, and spend is never under-counted. A settle that comes after that corrects
``spent`` to the real cost.

The limits live in Redis (``broker.keys.budget_key``), so ``rewardq budget set`` changes
them for the whole fleet at once, without a restart. Every reserve writes the worker's
settings' limits (``REWARDQ_BUDGET_USD``, ``REWARDQ_BUDGET_STEP_USD``) for its run
(``REWARDQ_BUDGET_RUN``) only where Redis has none (``HSETNX``): the first worker of a
run, or the CLI, sets a limit; a later worker with other settings logs once that the
fleet's limit differs instead of overriding it; and a Redis that lost its data gets the
limits back at the next call (not the spend: that is lost with it).

Money is counted in integer nano-dollars (``broker.keys.BUDGET_UNITS_PER_USD``), so
thousands of small charges add up exactly. A Redis error while reserving is an outage
(:class:`~broker.errors.BrokerUnavailableError`: the chunk is scored again once Redis is
back), never ``budget_exceeded``; after the call, a settle that cannot reach Redis is
logged and its hold is charged in full on expiry.

The training step of a call is read from :data:`CURRENT_STEP`, which
``WorkerRuntime.score`` sets for each chunk with :func:`in_step` (tasks the scorer creates
inherit it).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from broker.errors import BrokerUnavailableError, BudgetExceededError
from broker.keys import (
    BUDGET_RUNS,
    BUDGET_TTL_S,
    BUDGET_UNITS_PER_USD,
    budget_holds_key,
    budget_key,
)
from broker.schemas import Usage
from broker.settings import Settings
from monitoring.costs import Price, PriceTable

log = logging.getLogger(__name__)

T = TypeVar("T")

TOKENS_PER_MESSAGE_MAX = 4
"""Chat-format tokens a message can add beyond its text (OpenAI: 3, one more with a name)."""
REPLY_PRIMING_TOKENS = 3
"""Tokens the chat format adds to every prompt to prime the reply."""
HOLD_SLACK_S = 60.0
"""How much longer than the call's timeout(s) a hold lives before it counts as abandoned."""

#: The training step (``ScoreChunk.step``) the judge calls of the current task belong to.
CURRENT_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "rewardq_budget_step", default=None)

RESERVE_LUA = """
--[[
Reserve a judge call's worst-case cost against its run's budget and its step's.

KEYS[1]  rewardq:budget:run:<run>    HASH  integer nano-USD (and counts):
           limit, step_limit            the run's limit, each step's limit; absent or
                                        "none" = unlimited
           spent, reserved              settled spend; worst cases of the calls in flight
           calls, refused               calls settled; calls refused
           s:<step>:spent|reserved|refused   the same for one step
KEYS[2]  rewardq:budget:holds:<run> ZSET  "<hold id>|<nano-USD>|<step>" -> expiry, ms of
                                        Redis time; a hold past it belongs to a call that
                                        never settled (its worker died or lost Redis)
KEYS[3]  rewardq:budget:runs        SET   the runs with a budget hash
ARGV[1]  hold member   ARGV[2] its worst case, nano-USD (integer > 0)
ARGV[3]  step ("" = none)   ARGV[4] hold TTL, ms   ARGV[5] keys' TTL, s
ARGV[6]  the run's name   ARGV[7], ARGV[8] this process's limit and step limit, nano-USD
         ("" = none): written only where the hash has no such field (HSETNX), so a Redis
         that lost its data gets its limits back at the next call

First charges up to 64 expired holds in full (the provider may have billed them). Then
admits the call when spent + reserved + cost <= limit for the run and for the step:
returns {1, limit, step_limit} (reserved, the hold recorded; the limits as stored, ""
when absent), else {0, scope ("run" | "step"), spent, reserved, limit} with only the
refused counters changed.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run, holds = KEYS[1], KEYS[2]
local function num(field) return tonumber(redis.call('HGET', run, field)) or 0 end
-- integers as "%d": Lua's own formatting writes 1e+14 and -0, which HINCRBY rejects
local function add(field, n) return redis.call('HINCRBY', run, field, string.format('%d', n)) end

if ARGV[7] ~= '' then redis.call('HSETNX', run, 'limit', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSETNX', run, 'step_limit', ARGV[8]) end
redis.call('SADD', KEYS[3], ARGV[6])

local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, 64)
for _, member in ipairs(expired) do
  local amount, step = string.match(member, '^[^|]*|(%d+)|(.*)$')
  amount = tonumber(amount) or 0
  add('reserved', -amount)
  add('spent', amount)
  if step and step ~= '' then
    add('s:' .. step .. ':reserved', -amount)
    add('s:' .. step .. ':spent', amount)
  end
  redis.call('ZREM', holds, member)
end

local cost, step = tonumber(ARGV[2]), ARGV[3]
local function refuse(scope, spent, reserved, limit)
  add('refused', 1)
  if step ~= '' then add('s:' .. step .. ':refused', 1) end
  redis.call('EXPIRE', run, ARGV[5])
  return {0, scope, spent, reserved, limit}
end

local limit = tonumber(redis.call('HGET', run, 'limit'))
local spent, reserved = num('spent'), num('reserved')
if limit and spent + reserved + cost > limit then
  return refuse('run', spent, reserved, limit)
end
if step ~= '' then
  local step_limit = tonumber(redis.call('HGET', run, 'step_limit'))
  local s_spent, s_reserved = num('s:' .. step .. ':spent'), num('s:' .. step .. ':reserved')
  if step_limit and s_spent + s_reserved + cost > step_limit then
    return refuse('step', s_spent, s_reserved, step_limit)
  end
  add('s:' .. step .. ':reserved', cost)
end
add('reserved', cost)
redis.call('ZADD', holds, string.format('%d', now + tonumber(ARGV[4])), ARGV[1])
redis.call('EXPIRE', run, ARGV[5])
redis.call('EXPIRE', holds, ARGV[5])
return {1, redis.call('HGET', run, 'limit') or '', redis.call('HGET', run, 'step_limit') or ''}
"""

SETTLE_LUA = """
--[[
Settle a hold: charge what its call cost instead of its worst case (0 releases it).

KEYS[1]  rewardq:budget:run:<run>    HASH  (see the reserve script)
KEYS[2]  rewardq:budget:holds:<run> ZSET
ARGV[1]  hold member   ARGV[2] its worst case, nano-USD   ARGV[3] step ("" = none)
ARGV[4]  nano-USD to charge   ARGV[5] 1 = a call was made (counted in calls), else 0
ARGV[6]  keys' TTL, s

A hold still recorded leaves reserved and the charge goes to spent; one a reserve already
charged in full on expiry gets spent corrected by charge - worst case. Returns spent.
]]
local run = KEYS[1]
-- integers as "%d": Lua's own formatting writes 1e+14 and -0, which HINCRBY rejects
local function add(field, n) return redis.call('HINCRBY', run, field, string.format('%d', n)) end
local amount, step, charge = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local held = redis.call('ZREM', KEYS[2], ARGV[1]) == 1
local released = held and amount or 0
local delta = held and charge or (charge - amount)
add('reserved', -released)
local spent = add('spent', delta)
if step ~= '' then
  add('s:' .. step .. ':reserved', -released)
  add('s:' .. step .. ':spent', delta)
end
if ARGV[5] == '1' then add('calls', 1) end
redis.call('EXPIRE', run, ARGV[6])
return spent
"""


def usd_to_units(usd: float) -> int:
    """Whole nano-dollars (the unit the budget keys hold) of ``usd``, rounded."""
    return round(usd * BUDGET_UNITS_PER_USD)


def units_to_usd(units: int) -> float:
    """US dollars of ``units`` nano-dollars."""
    return units / BUDGET_UNITS_PER_USD


def cost_units(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Nano-dollars that ``price`` charges for the tokens, rounded up (the same rounding
    for a reservation and its settlement, so a call within its worst case never costs
    more than was reserved)."""
    per_mtok_to_units = BUDGET_UNITS_PER_USD / 1_000_000
    exact = (prompt_tokens * price.input_per_mtok
             + completion_tokens * price.output_per_mtok) * per_mtok_to_units
    return math.ceil(round(exact, 6))


def worst_case_tokens(body: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
    """The most (prompt, completion) tokens a chat-completions call with ``body`` can be
    billed: the UTF-8 bytes of every text part and name, :data:`TOKENS_PER_MESSAGE_MAX` per
    message and :data:`REPLY_PRIMING_TOKENS`; ``max_tokens`` per choice (``n``) of the reply.

    Args:
        body: the request (``messages``, optionally ``n``).
        max_tokens: the call's ``max_tokens``.

    Raises:
        ValueError: ``max_tokens`` is negative.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    messages: Sequence[Any] = body.get("messages") or ()
    prompt = REPLY_PRIMING_TOKENS
    for message in messages:
        prompt += TOKENS_PER_MESSAGE_MAX
        if not isinstance(message, Mapping):
            continue
        for key in ("content", "name"):
            prompt += _text_bytes(message.get(key))
    choices = body.get("n")
    return prompt, max_tokens * (choices if isinstance(choices, int) and choices > 0 else 1)


def _text_bytes(content: object) -> int:
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, Sequence):
        return sum(len(part["text"].encode()) for part in content
                   if isinstance(part, Mapping) and isinstance(part.get("text"), str))
    return 0


async def in_step(step: int | None, work: Awaitable[T]) -> T:
    """Await ``work`` with :data:`CURRENT_STEP` set to ``step``: the judge calls it makes
    (in tasks it creates, too) are charged to that step.

    Args:
        step: the chunk's training step (``None``: the run's budget alone applies).
        work: the scoring coroutine.
    """
    token = CURRENT_STEP.set(step)
    try:
        return await work
    finally:
        CURRENT_STEP.reset(token)


@dataclass(frozen=True)
class BudgetLimits:
    """A run's limits in US dollars (``None``: unlimited).

    Raises:
        ValueError: a limit that is not a positive finite number.
    """

    usd: float | None = None
    step_usd: float | None = None

    def __post_init__(self) -> None:
        for name, value in (("usd", self.usd), ("step_usd", self.step_usd)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"budget {name} must be a positive number, got {value!r}")


class BudgetHold:
    """One call's reservation: settle it with the reply's usage, or release it.

    Both are idempotent and never raise: the call's outcome is kept however Redis fares
    (an unsettled hold is charged in full when it expires).
    """

    __slots__ = ("_budget", "member", "units", "step", "_done")

    def __init__(self, budget: FleetBudget | None, member: str = "", units: int = 0,
                 step: int | None = None) -> None:
        self._budget = budget
        self.member = member
        self.units = units
        self.step = step
        self._done = budget is None

    async def settle(self, usage: Usage | None, model: str) -> None:
        """Charge what the reply cost: its ``usage`` priced for ``model`` (``None``: no
        usage in the reply, the worst case is charged)."""
        if self._done or self._budget is None:
            return
        self._done = True
        await self._budget._settle(self, usage, model, made=True)

    async def release(self) -> None:
        """The call failed or was abandoned: free its reservation, charge nothing."""
        if self._done or self._budget is None:
            return
        self._done = True
        await self._budget._settle(self, None, "", made=False)


NO_HOLD = BudgetHold(None)
"""The hold of a call the budget does not limit (no price, or no budget at all)."""


class Unbudgeted:
    """A judge client's budget when it has none: every call goes, nothing is counted."""

    async def reserve(self, model: str, body: Mapping[str, Any], max_tokens: int
                      ) -> BudgetHold:
        """:data:`NO_HOLD`, at once."""
        return NO_HOLD


class FleetBudget:
    """The judge budget of one run, shared through Redis by every worker process.

    Args:
        redis_client: an asyncio Redis client on the loop that calls this budget.
        run: the run whose spend and limits are counted (``Settings.budget_run``).
        prices: prices per model; calls of a model without a price are not limited.
        limits: the limits this process records for the run where Redis has none yet.
        hold_ttl_s: how long a reservation may go unsettled before a reserve charges it
            in full (longer than a call can take).
        key_ttl_s: how long the run's keys live after their last write.
    """

    def __init__(self, redis_client: aioredis.Redis, run: str, prices: PriceTable, *,
                 limits: BudgetLimits | None = None, hold_ttl_s: float = 120.0,
                 key_ttl_s: int = BUDGET_TTL_S) -> None:
        self.run = run
        self.prices = prices
        self.limits = limits or BudgetLimits()
        self._keys = [budget_key(run), budget_holds_key(run), BUDGET_RUNS]
        self._seed_args = [run, *("" if usd is None else str(usd_to_units(usd))
                                  for usd in (self.limits.usd, self.limits.step_usd))]
        self._redis = redis_client
        self._reserve = redis_client.register_script(RESERVE_LUA)
        self._settle_script = redis_client.register_script(SETTLE_LUA)
        self._hold_ttl_ms = max(1, int(hold_ttl_s * 1000))
        self._key_ttl_s = key_ttl_s
        self._checked = False

    @classmethod
    def from_settings(cls, settings: Settings, redis_client: aioredis.Redis,
                      prices: PriceTable | None = None) -> FleetBudget:
        """The budget of ``settings.budget_run`` with the settings' limits and prices; a
        hold outlives every endpoint's timeout (a call may fail over across them)."""
        return cls(redis_client, settings.budget_run,
                   prices or PriceTable.from_settings(settings),
                   limits=BudgetLimits(settings.budget_usd, settings.budget_step_usd),
                   hold_ttl_s=(len(settings.judge_endpoints) * settings.judge_timeout_s
                               + HOLD_SLACK_S))

    async def reserve(self, model: str, body: Mapping[str, Any], max_tokens: int
                      ) -> BudgetHold:
        """Reserve the worst case of one call before it is made, for the run and for the
        step in :data:`CURRENT_STEP`.

        Args:
            model: the judge model the call goes to (its price).
            body: the chat-completions request (its messages are measured).
            max_tokens: the call's ``max_tokens``.

        Returns:
            The hold to settle with the reply's usage (or release on failure);
            :data:`NO_HOLD` for a model without a price.

        Raises:
            BudgetExceededError: the run's or the step's budget cannot cover the call's
                worst case; the call must not be made.
            BrokerUnavailableError: Redis could not be reached.
        """
        price = self.prices.price(model)
        if price is None:
            return NO_HOLD
        units = cost_units(price, *worst_case_tokens(body, max_tokens))
        if units <= 0:
            return NO_HOLD
        the_step = CURRENT_STEP.get()
        member = f"{uuid.uuid4().hex[:16]}|{units}|{'' if the_step is None else the_step}"
        args: list[str | int] = [member, units, "" if the_step is None else str(the_step),
                                 self._hold_ttl_ms, self._key_ttl_s, *self._seed_args]
        try:
            answer = await self._reserve(keys=self._keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailableError(f"judge budget of run {self.run!r}: {exc}") from exc
        if int(answer[0]) != 1:
            scope = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
            raise BudgetExceededError(self._refusal(scope, the_step, units,
                                                    *(int(x) for x in answer[2:5])))
        if not self._checked:
            self._check_limits(answer[1], answer[2])
        return BudgetHold(self, member, units, the_step)

    def _check_limits(self, limit: object, step_limit: object) -> None:
        """Warn once when the fleet's limits (in Redis) are not this process's settings."""
        self._checked = True
        for name, usd, raw in (("REWARDQ_BUDGET_USD", self.limits.usd, limit),
                               ("REWARDQ_BUDGET_STEP_USD", self.limits.step_usd, step_limit)):
            fleet = _units(raw)
            if usd is not None and fleet != usd_to_units(usd):
                log.warning("the judge budget of run %r is %s, not %s=%s: Redis holds the "
                            "fleet's limit (`rewardq budget set` changes it)", self.run,
                            "unlimited" if fleet is None else f"{units_to_usd(fleet):g} USD",
                            name, usd)

    async def _settle(self, hold: BudgetHold, usage: Usage | None, model: str, *,
                      made: bool) -> None:
        if not made:
            charge = 0
        elif usage is None:
            charge = hold.units
        else:
            price = self.prices.price(model)
            charge = cost_units(price, usage.prompt_tokens, usage.completion_tokens) \
                if price is not None else hold.units
        args: list[str | int] = [hold.member, hold.units,
                                 "" if hold.step is None else str(hold.step), charge,
                                 1 if made else 0, self._key_ttl_s]
        try:
            await asyncio.shield(self._settle_script(keys=self._keys[:2], args=args))
        except (redis.RedisError, OSError) as exc:
            log.warning("judge budget of run %r: a %s of %d nano-USD did not reach Redis "
                        "(%s); its hold is charged in full when it expires", self.run,
                        "settle" if made else "release", charge, exc)

    def _refusal(self, scope: str, step: int | None, units: int, spent: int, reserved: int,
                 limit: int) -> str:
        where = f"run {self.run!r}" if scope == "run" else f"step {step} of run {self.run!r}"
        option = "--usd" if scope == "run" else "--step-usd"
        return (f"judge budget of {where} exhausted: {units_to_usd(spent):.6f} USD spent and "
                f"{units_to_usd(reserved):.6f} in flight of {units_to_usd(limit):.6f} leave "
                f"less than this call's worst case, {units_to_usd(units):.6f} USD (raise it "
                f"with `rewardq budget set {option} ...`, then `rewardq failed replay --all`)")


def _units(raw: object) -> int | None:
    """A stored limit in nano-USD; ``None`` when absent (``""``) or ``"none"``."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        return int(text)
    except ValueError:
        return None
