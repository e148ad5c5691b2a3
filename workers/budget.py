"""The fleet-wide judge budget: US dollars per run and per training step, held in Redis.

Every judge call that has a price (``rewardq.monitoring.costs.PriceTable``) is gated here, in
``JudgeClient.complete``, after the rate limiter admitted it:

1. **reserve** an *estimate* of the call's cost before it is made, learned from what the
   fleet's earlier replies of the same model really cost (below). One atomic Lua call
   decides, for the run's limit and for the step's:

   - the estimate fits beside the spend and the calls in flight
     (``spent + reserved + estimate <= limit``): the call goes, its estimate reserved;
   - nothing is left (``spent >= limit``): the call is refused at once with
     :class:`~rewardq.broker.errors.BudgetExceededError` (the item comes back ``budget_exceeded``
     and is dead-lettered for a replay);
   - it does not fit but calls are in flight (``reserved > 0``): the call **waits** for
     them to settle and asks again, for as long as its deadline allows (the chunk's, from
     :func:`in_step`; else as long as a hold may live). Their settlements give back what
     they reserved beyond their real cost, so the call may fit then;
   - it does not fit, nothing is in flight and money is left: the call goes. It is the
     last one the budget pays for, and the only thing that can take ``spent`` past the
     limit (by its cost beyond what was left).

   A call is therefore refused only when the limit is spent, or when it waited its whole
   deadline behind calls that never settled. The calls of one process that wait queue in
   order: only the first asks Redis again, on each settlement of this process and every
   ``poll_s`` for the fleet's, so waiting costs one Lua call per settlement, not one per
   waiter;
2. **settle** it once the reply is read: its reservation leaves ``reserved``, what the
   reply's ``usage`` really cost (prompt and completion tokens; reasoning tokens are part
   of the completion tokens and billed with them, never counted twice) is added to
   ``spent``, and the usage teaches the estimate (a reply without usage is charged the
   call's worst case and teaches nothing); a call that failed or was cancelled releases
   its reservation.

The estimate. A call's *worst case* is the most its request can be billed: the prompt's
UTF-8 bytes (a token is at least one byte for the byte-level BPE tokenizers providers bill
by) plus the chat format's tokens (:func:`worst_case_tokens`), and its whole reply budget
(``max_tokens``; for a reasoning judge thousands of tokens its thinking rarely uses). Per
run and model, Redis keeps two learned figures (``rewardq.broker.keys.budget_usage_key``):
prompt tokens billed per worst-case prompt token, and completion tokens per reply. Each
follows the peaks of what replies report: a reply above it raises it at once, one below
lowers it by 1/:data:`LEARN_DECAY` of the difference, so it sits near the top of recent
replies rather than at their mean. The estimate is those figures applied to the call's own
worst-case prompt and capped by its reply budget, priced for its model, and never more
than the worst case. Before the model's first reply the estimate is the worst case: a
fresh run starts conservative and learns from its first settlement on.

Bounds. A capped run stops with nothing unspent: a call is refused only once ``spent``
reached the limit (or its deadline passed while calls were in flight). ``spent`` can pass
the limit by the last call's cost beyond what was left, plus whatever the calls in flight
at the end cost beyond their estimates (an estimate follows the recent peak, so this is
rare and small). A cap that is never passed would have to hold every call in flight at
its worst case, and a capped run would then end with up to a worst case unspent (several
real calls; far more for a reasoning judge, whose worst case is its whole reply budget),
and a replay after raising the limit to exactly what the refused items cost could not
score the last of them.

A reservation whose call never settles (the worker was killed or lost Redis mid-call, or
the reply was no chat completion at all) is a *hold* with an expiry (every endpoint's
timeout plus a minute); the next reserve anywhere in the fleet charges its *worst case*
(the provider may have billed it) and frees it, so a dead worker cannot shrink the budget
forever, and spend is never under-counted. A settle that comes after that corrects
``spent`` to the real cost.

The limits live in Redis (``rewardq.broker.keys.budget_key``), so ``rewardq budget set`` changes
them for the whole fleet at once, without a restart: raising one lets the waiting calls
go at their next ask, and ``rewardq failed replay --all`` scores the refused items. Every
reserve writes the worker's settings' limits (``REWARDQ_BUDGET_USD``,
``REWARDQ_BUDGET_STEP_USD``) for its run (``REWARDQ_BUDGET_RUN``) only where Redis has
none (``HSETNX``): the first worker of a run, or the CLI, sets a limit; a later worker
with other settings logs once that the fleet's limit differs instead of overriding it;
and a Redis that lost its data gets the limits back at the next call (not the spend:
that is lost with it).

Money is counted in integer nano-dollars (``rewardq.broker.keys.BUDGET_UNITS_PER_USD``), so
thousands of small charges add up exactly. A Redis error while reserving is an outage
(:class:`~rewardq.broker.errors.BrokerUnavailableError`: the chunk is scored again once Redis is
back), never ``budget_exceeded``; after the call, a settle that cannot reach Redis is
logged and its hold is charged its worst case on expiry.

The training step of a call is read from :data:`CURRENT_STEP`, and how long it may wait
from :data:`CURRENT_DEADLINE`; ``WorkerRuntime.score`` sets both for each chunk with
:func:`in_step` (tasks the scorer creates inherit them).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis

from rewardq.broker.connections import reply_text
from rewardq.broker.errors import BrokerUnavailableError, BudgetExceededError
from rewardq.broker.keys import (
    BUDGET_RUNS,
    BUDGET_TTL_S,
    BUDGET_UNITS_PER_USD,
    budget_holds_key,
    budget_key,
    budget_usage_key,
)
from rewardq.broker.schemas import Usage
from rewardq.broker.settings import Settings
from rewardq.judge.messages import message_texts
from rewardq.monitoring.costs import Price, PriceTable

log = logging.getLogger(__name__)

T = TypeVar("T")

TOKENS_PER_MESSAGE_MAX = 4
"""Chat-format tokens a message can add beyond its text (OpenAI: 3, one more with a name)."""
REPLY_PRIMING_TOKENS = 3
"""Tokens the chat format adds to every prompt to prime the reply."""
HOLD_SLACK_S = 60.0
"""How much longer than the call's timeout(s) a hold lives before it counts as abandoned."""
LEARN_DECAY = 16
"""A learned figure moves down by 1/LEARN_DECAY of the gap to a lower reply (up at once)."""
POLL_S = 0.02
"""How often the first waiting call of a process asks again for the fleet's settlements."""

#: The training step (``ScoreChunk.step``) the judge calls of the current task belong to.
CURRENT_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "rewardq_budget_step", default=None)
#: The wall-clock time (``time.time()``) past which a call of the current task no longer
#: waits for the calls in flight to settle (the chunk's deadline).
CURRENT_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "rewardq_budget_deadline", default=None)


RESERVE_LUA = """
--[[
Reserve a judge call's estimated cost against its run's budget and its step's.

KEYS[1]  rewardq:budget:run:<run>    HASH  integer nano-USD (and counts):
           limit, step_limit            the run's limit, each step's limit; absent or
                                        "none" = unlimited
           spent, reserved              settled spend; estimates of the calls in flight
           calls, refused               calls settled; calls refused
           s:<step>:spent|reserved|refused   the same for one step
KEYS[2]  rewardq:budget:holds:<run> ZSET  "<hold id>|<estimate>|<step>|<worst case>" ->
                                        expiry, ms of Redis time; a hold past it belongs
                                        to a call that never settled (its worker died or
                                        lost Redis)
KEYS[3]  rewardq:budget:runs        SET   the runs with a budget hash
KEYS[4]  rewardq:budget:usage:<run> HASH  <model>|prompt_ppm, <model>|reply_milli: what
                                        replies cost (learned by the settle script)
ARGV[1]  hold id   ARGV[2] model   ARGV[3] worst-case prompt tokens   ARGV[4] reply budget
ARGV[5], ARGV[6]  nano-USD per prompt token, per completion token
ARGV[7]  the call's worst case, nano-USD (integer > 0)
ARGV[8]  step ("" = none)   ARGV[9] hold TTL, ms   ARGV[10] keys' TTL, s
ARGV[11] the run's name   ARGV[12], ARGV[13] this process's limit and step limit, nano-USD
         ("" = none): written only where the hash has no such field (HSETNX), so a Redis
         that lost its data gets its limits back at the next call

First charges up to 64 expired holds their worst case (the provider may have billed it).
Then estimates the call (the worst case until the model has a reply) and decides, for
the run and for the step:
  spent + reserved + estimate <= limit (or no limit)   -> goes
  spent >= limit                                       -> refused
  reserved > 0                                         -> waits (calls in flight)
  else (nothing in flight, money left: the last call)  -> goes
Returns {1, estimate, limit, step_limit} (reserved, the hold recorded; the limits as
stored, "" when absent), {0, scope, spent, reserved, limit, estimate} (refused, counted)
or {2, scope, spent, reserved, limit, estimate} (wait; nothing changed). scope: "run" or
"step".
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local run, holds, usage = KEYS[1], KEYS[2], KEYS[4]
local function num(field) return tonumber(redis.call('HGET', run, field)) or 0 end
-- integers as "%d": Lua's own formatting writes 1e+14 and -0, which HINCRBY rejects
local function fmt(n) return string.format('%d', n) end
local function add(field, n) return redis.call('HINCRBY', run, field, fmt(n)) end

if ARGV[12] ~= '' then redis.call('HSETNX', run, 'limit', ARGV[12]) end
if ARGV[13] ~= '' then redis.call('HSETNX', run, 'step_limit', ARGV[13]) end
redis.call('SADD', KEYS[3], ARGV[11])

local expired = redis.call('ZRANGEBYSCORE', holds, '-inf', now, 'LIMIT', 0, 64)
for _, member in ipairs(expired) do
  local amount, step, worst = string.match(member, '^[^|]*|(%d+)|([^|]*)|(%d+)$')
  if not amount then  -- a hold of the format without a worst case: its amount was one
    amount, step = string.match(member, '^[^|]*|(%d+)|(.*)$')
    worst = amount
  end
  amount, worst = tonumber(amount) or 0, tonumber(worst) or 0
  add('reserved', -amount)
  add('spent', worst)
  if step and step ~= '' then
    add('s:' .. step .. ':reserved', -amount)
    add('s:' .. step .. ':spent', worst)
  end
  redis.call('ZREM', holds, member)
end

local worst = tonumber(ARGV[7])
local cost = worst
local ratio = tonumber(redis.call('HGET', usage, ARGV[2] .. '|prompt_ppm'))
local reply = tonumber(redis.call('HGET', usage, ARGV[2] .. '|reply_milli'))
if ratio and reply then
  local prompt = math.ceil(tonumber(ARGV[3]) * ratio / 1000000)
  local completion = math.min(tonumber(ARGV[4]), math.ceil(reply / 1000))
  local priced = math.ceil(prompt * tonumber(ARGV[5]) + completion * tonumber(ARGV[6]))
  cost = math.max(1, math.min(worst, priced))
end

local step = ARGV[8]
local function decide(spent, reserved, limit)
  if not limit or spent + reserved + cost <= limit then return 'go' end
  if spent >= limit then return 'refuse' end
  if reserved > 0 then return 'wait' end
  return 'go'
end

local limit = tonumber(redis.call('HGET', run, 'limit'))
local spent, reserved = num('spent'), num('reserved')
local answers = {{'run', decide(spent, reserved, limit), spent, reserved, limit}}
if step ~= '' then
  local step_limit = tonumber(redis.call('HGET', run, 'step_limit'))
  local s_spent, s_reserved = num('s:' .. step .. ':spent'), num('s:' .. step .. ':reserved')
  answers[2] = {'step', decide(s_spent, s_reserved, step_limit), s_spent, s_reserved,
                step_limit}
end
for _, a in ipairs(answers) do
  if a[2] == 'refuse' then
    add('refused', 1)
    if step ~= '' then add('s:' .. step .. ':refused', 1) end
    redis.call('EXPIRE', run, ARGV[10])
    return {0, a[1], fmt(a[3]), fmt(a[4]), fmt(a[5]), fmt(cost)}
  end
end
for _, a in ipairs(answers) do
  if a[2] == 'wait' then return {2, a[1], fmt(a[3]), fmt(a[4]), fmt(a[5]), fmt(cost)} end
end

if step ~= '' then add('s:' .. step .. ':reserved', cost) end
add('reserved', cost)
local member = ARGV[1] .. '|' .. fmt(cost) .. '|' .. step .. '|' .. fmt(worst)
redis.call('ZADD', holds, fmt(now + tonumber(ARGV[9])), member)
redis.call('EXPIRE', run, ARGV[10])
redis.call('EXPIRE', holds, ARGV[10])
return {1, fmt(cost), redis.call('HGET', run, 'limit') or '',
        redis.call('HGET', run, 'step_limit') or ''}
"""

SETTLE_LUA = """
--[[
Settle a hold: charge what its call cost instead of its estimate (0 releases it), and
learn from the reply's usage.

KEYS[1]  rewardq:budget:run:<run>    HASH  (see the reserve script)
KEYS[2]  rewardq:budget:holds:<run> ZSET
KEYS[3]  rewardq:budget:usage:<run> HASH
ARGV[1]  hold member   ARGV[2] its estimate, nano-USD   ARGV[3] step ("" = none)
ARGV[4]  nano-USD to charge   ARGV[5] 1 = a call was made (counted in calls), else 0
ARGV[6]  keys' TTL, s   ARGV[7] the hold's worst case, nano-USD
ARGV[8]  model to learn for ("" = nothing to learn)   ARGV[9] worst-case prompt tokens
ARGV[10] prompt tokens billed   ARGV[11] completion tokens billed   ARGV[12] decay

A hold still recorded leaves reserved and the charge goes to spent; one a reserve already
charged its worst case on expiry gets spent corrected by charge - worst case. A learned
figure rises to a higher reply at once and falls by 1/decay of the gap to a lower one.
Returns spent.
]]
local run = KEYS[1]
-- integers as "%d": Lua's own formatting writes 1e+14 and -0, which HINCRBY rejects
local function fmt(n) return string.format('%d', n) end
local function add(field, n) return redis.call('HINCRBY', run, field, fmt(n)) end
local amount, step, charge = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local held = redis.call('ZREM', KEYS[2], ARGV[1]) == 1
local released = held and amount or 0
local delta = held and charge or (charge - tonumber(ARGV[7]))
add('reserved', -released)
local spent = add('spent', delta)
if step ~= '' then
  add('s:' .. step .. ':reserved', -released)
  add('s:' .. step .. ':spent', delta)
end
if ARGV[5] == '1' then add('calls', 1) end
redis.call('EXPIRE', run, ARGV[6])

if ARGV[8] ~= '' then
  local decay = tonumber(ARGV[12])
  local function learn(field, seen)
    local known = tonumber(redis.call('HGET', KEYS[3], field))
    local value = seen
    if known and seen < known then value = known - math.floor((known - seen) / decay) end
    redis.call('HSET', KEYS[3], field, fmt(value))
  end
  learn(ARGV[8] .. '|prompt_ppm', math.ceil(tonumber(ARGV[10]) * 1000000 / tonumber(ARGV[9])))
  learn(ARGV[8] .. '|reply_milli', tonumber(ARGV[11]) * 1000)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
return spent
"""

GIVE_UP_LUA = """
--[[
Count a call refused after it waited its whole deadline for the calls in flight.
KEYS[1] rewardq:budget:run:<run> HASH   ARGV[1] step ("" = none)   ARGV[2] keys' TTL, s
]]
redis.call('HINCRBY', KEYS[1], 'refused', 1)
if ARGV[1] ~= '' then redis.call('HINCRBY', KEYS[1], 's:' .. ARGV[1] .. ':refused', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


def usd_to_units(usd: float) -> int:
    """Whole nano-dollars (the unit the budget keys hold) of ``usd``, rounded."""
    return round(usd * BUDGET_UNITS_PER_USD)


def units_to_usd(units: int) -> float:
    """US dollars of ``units`` nano-dollars."""
    return units / BUDGET_UNITS_PER_USD


def cost_units(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """Nano-dollars that ``price`` charges for the tokens, rounded up (the same rounding
    for a worst case and a settlement, so a call within its worst case never costs more
    than its worst case)."""
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
        max_tokens: the call's reply budget (``max_tokens`` or ``max_completion_tokens``).

    Raises:
        ValueError: ``max_tokens`` is negative.
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    messages: Sequence[Any] = body.get("messages") or ()
    prompt = REPLY_PRIMING_TOKENS
    for message in messages:
        texts = message_texts(message, ("content", "name"))
        prompt += TOKENS_PER_MESSAGE_MAX + sum(len(text.encode()) for text in texts)
    choices = body.get("n")
    return prompt, max_tokens * (choices if isinstance(choices, int) and choices > 0 else 1)


async def in_step(step: int | None, work: Awaitable[T], deadline: float | None = None) -> T:
    """Await ``work`` with :data:`CURRENT_STEP` set to ``step`` and :data:`CURRENT_DEADLINE`
    to ``deadline``: the judge calls it makes (in tasks it creates, too) are charged to
    that step, and wait for the calls in flight at most until that time.

    Args:
        step: the chunk's training step (``None``: the run's budget alone applies).
        work: the scoring coroutine.
        deadline: the chunk's deadline, ``time.time()`` seconds (``None``: a call waits
            at most as long as a hold may live).
    """
    step_token = CURRENT_STEP.set(step)
    deadline_token = CURRENT_DEADLINE.set(deadline)
    try:
        return await work
    finally:
        CURRENT_DEADLINE.reset(deadline_token)
        CURRENT_STEP.reset(step_token)


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


@dataclass(frozen=True, slots=True)
class _Call:
    """What one reserve asks for."""

    model: str
    prompt_worst: int
    reply_max: int
    worst: int
    step: int | None
    hold_id: str


class BudgetHold:
    """One call's reservation: settle it with the reply's usage, or release it.

    Both are idempotent and never raise: the call's outcome is kept however Redis fares
    (an unsettled hold is charged its worst case when it expires).

    Attributes:
        units: the estimate reserved, nano-USD.
        worst: the call's worst case, nano-USD (charged for a reply without usage).
        step: the training step it is charged to.
    """

    __slots__ = ("_budget", "_call", "member", "units", "worst", "step", "_done")

    def __init__(self, budget: FleetBudget | None, call: _Call | None = None,
                 units: int = 0) -> None:
        self._budget = budget
        self._call = call
        self.units = units
        self.worst = call.worst if call is not None else 0
        self.step = call.step if call is not None else None
        step = "" if self.step is None else str(self.step)
        self.member = "" if call is None else f"{call.hold_id}|{units}|{step}|{self.worst}"
        self._done = budget is None

    async def settle(self, usage: Usage | None, model: str) -> None:
        """Charge what the reply cost: its ``usage`` priced for ``model`` (``None``: no
        usage in the reply, the worst case is charged)."""
        if self._done or self._budget is None or self._call is None:
            return
        self._done = True
        await self._budget._settle(self, self._call, usage, model, made=True)

    async def release(self) -> None:
        """The call failed or was abandoned: free its reservation, charge nothing."""
        if self._done or self._budget is None or self._call is None:
            return
        self._done = True
        await self._budget._settle(self, self._call, None, "", made=False)


NO_HOLD = BudgetHold(None)
"""The hold of a call the budget does not limit (no price, or no budget at all)."""


class Unbudgeted:
    """A judge client's budget when it has none: every call goes, nothing is counted."""

    async def reserve(self, model: str, body: Mapping[str, Any], max_tokens: int
                      ) -> BudgetHold:
        """:data:`NO_HOLD`, at once."""
        return NO_HOLD


@dataclass(frozen=True, slots=True)
class _Answer:
    """The reserve script's answer when the call does not go: refused or waiting."""

    refused: bool
    scope: str
    spent: int
    reserved: int
    limit: int
    estimate: int


class FleetBudget:
    """The judge budget of one run, shared through Redis by every worker process.

    Args:
        redis_client: an asyncio Redis client on the loop that calls this budget.
        run: the run whose spend and limits are counted (``Settings.budget_run``).
        prices: prices per model; calls of a model without a price are not limited.
        limits: the limits this process records for the run where Redis has none yet.
        hold_ttl_s: how long a reservation may go unsettled before a reserve charges it
            its worst case (longer than a call can take); also how long a call waits for
            the calls in flight when its task set no deadline (:func:`in_step`).
        key_ttl_s: how long the run's keys live after their last write.
        poll_s: how often the first waiting call of this process asks again without a
            settlement of its own process (for the rest of the fleet's).
    """

    def __init__(self, redis_client: aioredis.Redis, run: str, prices: PriceTable, *,
                 limits: BudgetLimits | None = None, hold_ttl_s: float = 120.0,
                 key_ttl_s: int = BUDGET_TTL_S, poll_s: float = POLL_S) -> None:
        self.run = run
        self.prices = prices
        self.limits = limits or BudgetLimits()
        self._keys = [budget_key(run), budget_holds_key(run), BUDGET_RUNS,
                      budget_usage_key(run)]
        self._settle_keys = [budget_key(run), budget_holds_key(run), budget_usage_key(run)]
        self._seed_args = [run, *("" if usd is None else str(usd_to_units(usd))
                                  for usd in (self.limits.usd, self.limits.step_usd))]
        self._redis = redis_client
        self._reserve = redis_client.register_script(RESERVE_LUA)
        self._settle_script = redis_client.register_script(SETTLE_LUA)
        self._give_up_script = redis_client.register_script(GIVE_UP_LUA)
        self._hold_ttl_s = hold_ttl_s
        self._hold_ttl_ms = max(1, int(hold_ttl_s * 1000))
        self._key_ttl_s = key_ttl_s
        self._poll_s = poll_s
        self._checked = False
        #: This process's calls waiting for room, in order; the first one asks Redis.
        self._waiting: deque[asyncio.Future[None]] = deque()
        #: Settlements (and releases) this process made; a waiter wakes on each.
        self._settlements = 0
        self._settled: asyncio.Event | None = None

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

    @property
    def waiting(self) -> int:
        """Calls of this process waiting for the calls in flight to settle."""
        return len(self._waiting)

    async def reserve(self, model: str, body: Mapping[str, Any], max_tokens: int
                      ) -> BudgetHold:
        """Reserve the estimated cost of one call before it is made, for the run and for
        the step in :data:`CURRENT_STEP`; wait for the calls in flight to settle while it
        does not fit beside them, until :data:`CURRENT_DEADLINE`.

        Args:
            model: the judge model the call goes to (its price, its learned usage).
            body: the chat-completions request (its messages are measured).
            max_tokens: the call's reply budget (``max_tokens`` or
                ``max_completion_tokens``, times ``n``).

        Returns:
            The hold to settle with the reply's usage (or release on failure);
            :data:`NO_HOLD` for a model without a price.

        Raises:
            BudgetExceededError: the run's or the step's limit is spent, or the call
                waited until its deadline for calls in flight that did not settle; the
                call must not be made.
            BrokerUnavailableError: Redis could not be reached.
        """
        price = self.prices.price(model)
        if price is None:
            return NO_HOLD
        prompt_worst, reply_max = worst_case_tokens(body, max_tokens)
        worst = cost_units(price, prompt_worst, reply_max)
        if worst <= 0:
            return NO_HOLD
        call = _Call(model, prompt_worst, reply_max, worst, CURRENT_STEP.get(),
                     uuid.uuid4().hex[:16])
        if not self._waiting:  # else queue behind this process's waiting calls
            answer = await self._ask(call, price)
            if isinstance(answer, BudgetHold):
                return answer
        return await self._wait_for_room(call, price)

    async def _ask(self, call: _Call, price: Price) -> BudgetHold | _Answer:
        """One reserve script call: the hold, or why not (raised when refused)."""
        per_token = BUDGET_UNITS_PER_USD / 1_000_000
        args: list[str | int] = [
            call.hold_id, call.model, call.prompt_worst, call.reply_max,
            repr(price.input_per_mtok * per_token), repr(price.output_per_mtok * per_token),
            call.worst, "" if call.step is None else str(call.step), self._hold_ttl_ms,
            self._key_ttl_s, *self._seed_args]
        try:
            raw = await self._reserve(keys=self._keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise BrokerUnavailableError(f"judge budget of run {self.run!r}: {exc}") from exc
        if int(raw[0]) == 1:
            if not self._checked:
                self._check_limits(raw[2], raw[3])
            return BudgetHold(self, call, int(raw[1]))
        answer = _Answer(int(raw[0]) == 0, reply_text(raw[1]), *(int(x) for x in raw[2:6]))
        if answer.refused:
            raise BudgetExceededError(self._refusal(answer, call))
        return answer

    async def _wait_for_room(self, call: _Call, price: Price) -> BudgetHold:
        """Queue behind this process's waiting calls, then ask again on every settlement
        (this process's at once, the fleet's every ``poll_s``) until the call goes, is
        refused, or its deadline passes."""
        loop = asyncio.get_running_loop()
        deadline = self._deadline(loop)
        started = loop.time()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        if self._waiting[0] is turn:
            turn.set_result(None)
        try:
            left = deadline - loop.time()
            if not turn.done() and left > 0:
                await asyncio.wait({turn}, timeout=left)
            last: _Answer | None = None
            while turn.done():
                seen = self._settlements
                answer = await self._ask(call, price)
                if isinstance(answer, BudgetHold):
                    return answer
                last = answer
                left = deadline - loop.time()
                if left <= 0:
                    break
                if self._settlements == seen:
                    await self._next_settlement(min(self._poll_s, left))
            raise BudgetExceededError(await self._give_up(call, last, loop.time() - started))
        finally:
            first = self._waiting[0] is turn
            self._waiting.remove(turn)
            if first and self._waiting:
                self._waiting[0].set_result(None)

    async def _next_settlement(self, timeout_s: float) -> None:
        """Return at this process's next settlement, or after ``timeout_s``."""
        if self._settled is None:
            self._settled = asyncio.Event()
        self._settled.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout_s)

    def _deadline(self, loop: asyncio.AbstractEventLoop) -> float:
        """The loop time until which a call may wait: the task's deadline, else as long
        as a hold may live."""
        wall = CURRENT_DEADLINE.get()
        if wall is None:
            return loop.time() + self._hold_ttl_s
        return loop.time() + max(0.0, wall - time.time())

    async def _give_up(self, call: _Call, last: _Answer | None, waited_s: float) -> str:
        """Count the refusal of a call whose deadline passed while it waited; its message."""
        step = "" if call.step is None else str(call.step)
        try:
            await self._give_up_script(keys=self._keys[:1], args=[step, self._key_ttl_s])
        except (redis.RedisError, OSError) as exc:
            log.warning("judge budget of run %r: a refusal was not counted (%s)", self.run,
                        exc)
        where = self._where(last.scope if last is not None else "run", call.step)
        option = "--usd" if last is None or last.scope == "run" else "--step-usd"
        state = "" if last is None else (
            f": {units_to_usd(last.spent):.6f} USD spent and {units_to_usd(last.reserved):.6f} "
            f"in flight of {units_to_usd(last.limit):.6f} left no room for this call's "
            f"estimated {units_to_usd(last.estimate):.6f} USD")
        return (f"judge budget of {where} exhausted{state}, and the calls in flight did not "
                f"settle within the call's deadline ({waited_s:.1f} s of waiting; raise it "
                f"with `rewardq budget set {option} ...`, then `rewardq failed replay --all`)")

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

    async def _settle(self, hold: BudgetHold, call: _Call, usage: Usage | None, model: str,
                      *, made: bool) -> None:
        price = self.prices.price(model) if made else None
        learn = made and usage is not None and price is not None and usage.prompt_tokens > 0
        if not made:
            charge = 0
        elif usage is None or price is None:
            charge = hold.worst
        else:
            # completion_tokens already hold the reasoning tokens: priced once, as output.
            charge = cost_units(price, usage.prompt_tokens, usage.completion_tokens)
        args: list[str | int] = [
            hold.member, hold.units, "" if hold.step is None else str(hold.step), charge,
            1 if made else 0, self._key_ttl_s, hold.worst, call.model if learn else "",
            call.prompt_worst, usage.prompt_tokens if learn and usage else 0,
            usage.completion_tokens if learn and usage else 0, LEARN_DECAY]
        try:
            await asyncio.shield(self._settle_script(keys=self._settle_keys, args=args))
        except (redis.RedisError, OSError) as exc:
            log.warning("judge budget of run %r: a %s of %d nano-USD did not reach Redis "
                        "(%s); its hold is charged its worst case when it expires", self.run,
                        "settle" if made else "release", charge, exc)
        finally:
            self._settlements += 1
            if self._settled is not None:
                self._settled.set()

    def _where(self, scope: str, step: int | None) -> str:
        return f"run {self.run!r}" if scope == "run" else f"step {step} of run {self.run!r}"

    def _refusal(self, answer: _Answer, call: _Call) -> str:
        option = "--usd" if answer.scope == "run" else "--step-usd"
        return (f"judge budget of {self._where(answer.scope, call.step)} exhausted: "
                f"{units_to_usd(answer.spent):.6f} USD spent of "
                f"{units_to_usd(answer.limit):.6f} (raise it with `rewardq budget set "
                f"{option} ...`, then `rewardq failed replay --all`)")



def _units(raw: object) -> int | None:
    """A stored limit in nano-USD; ``None`` when absent (``""``) or ``"none"``."""
    try:
        return int(reply_text(raw))
    except ValueError:
        return None
