"""The fleet-wide judge budget: real Redis, real Lua, real workers.

- the reserve/settle accounting of ``rewardq.workers.budget`` on a real Redis: estimates learned
  from replies (the worst case before the first, peaks followed, capped by the call),
  reasoning tokens priced once, a call that does not fit waiting for the calls in flight
  (in order, until its deadline, or until the limit is raised) and refused only once the
  limit is spent, the last call going while money is left, per-step limits, settle and
  release, concurrent callers leaving nothing unspent, abandoned holds charged their worst
  case on expiry, a model without a price never limited, the settings seeding a limit only
  where Redis has none, a lost Redis an outage (never ``budget_exceeded``);
- ``rewardq budget show | set | reset`` as a subprocess, ``rewardq stats`` and the fleet
  metrics reading the same state;
- acceptance: a run with half the budget it needs, on 4 real worker processes x 256 judge
  calls in flight and the local judge, plain and an OpenAI reasoning model: the spend
  ends at the limit, past it by at most a few calls' real cost and never short of it; the
  rest of the items come back ``budget_exceeded`` and dead-lettered, never judged;
  ``rewardq budget set`` raises it to exactly a full run's cost without a restart and
  ``rewardq failed replay --all`` scores every refused item.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from conftest import worker_logs
from hypothesis import given
from hypothesis import strategies as st
from scoring_data import expected, make_items

from rewardq.broker.connections import OUTAGE_ERRORS
from rewardq.broker.dead_letters import DeadLetters
from rewardq.broker.embedded import free_port
from rewardq.broker.errors import BrokerUnavailableError, BudgetExceededError
from rewardq.broker.keys import BUDGET_UNITS_PER_USD, budget_holds_key, budget_key
from rewardq.broker.schemas import ResultStatus, Usage
from rewardq.broker.settings import Settings
from rewardq.budget_cli import read_budget, set_limits
from rewardq.judge_server.protocol import prompt_tokens
from rewardq.monitoring.costs import Price, PriceTable
from rewardq.monitoring.metrics import FleetCollector
from rewardq.producer.client import RewardClient
from rewardq.producer.sync_judge import SyncJudge
from rewardq.stack import JudgeProcess, settings_env
from rewardq.stats_view import run_stats
from rewardq.workers.budget import (
    BudgetHold,
    BudgetLimits,
    FleetBudget,
    budget_usage_key,
    cost_units,
    in_step,
    units_to_usd,
    worst_case_tokens,
)

T = TypeVar("T")

MODEL = "judge-m"
#: $1 per million tokens both ways: one token costs 1,000 nano-USD, easy to reason in.
PRICES = PriceTable({MODEL: [1.0, 1.0]})


def body_of(prompt_bytes: int) -> dict[str, Any]:
    """A request whose worst case is ``prompt_bytes + 7`` prompt tokens (one message)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "x" * prompt_bytes}]}


def run(url: str, body: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
    """Run ``body`` with a fresh asyncio client on a fresh event loop."""
    async def main() -> T:
        client = aioredis.Redis.from_url(url)
        try:
            return await body(client)
        finally:
            await client.aclose()
    return asyncio.run(main())


def state(url: str, run_name: str) -> dict[str, int]:
    """The run's budget hash as integers (``none`` limits left out)."""
    client = redis.Redis.from_url(url)
    try:
        raw = client.hgetall(budget_key(run_name))
    finally:
        client.close()
    return {k.decode(): int(v) for k, v in raw.items() if v != b"none"}


# -- the accounting on a real Redis -------------------------------------------------------


def test_a_call_that_does_not_fit_waits_for_the_calls_in_flight_and_goes_at_a_settlement(
        redis_url: str) -> None:
    # Before any reply the estimate is the worst case: (93 + 7) prompt tokens = 100,000.
    async def body(client: aioredis.Redis) -> tuple[list[str], list[dict[str, int]], int]:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=0.00035))
        holds = [await budget.reserve(MODEL, body_of(93), 0) for _ in range(3)]
        events: list[str] = []

        async def fourth() -> int:
            hold = await budget.reserve(MODEL, body_of(93), 0)
            events.append("fourth admitted")
            return hold.units

        waiting = asyncio.create_task(fourth())
        await asyncio.sleep(0.2)  # 3 x 100,000 in flight: 400,000 > 350,000, so it waits
        seen = [state(redis_url, "r")]
        events.append(f"waiting={budget.waiting}")
        await holds[0].settle(Usage(prompt_tokens=30), MODEL)  # 30 of 100 worst-case tokens
        events.append("settled")
        units = await waiting
        await holds[1].release()
        await holds[1].settle(Usage(prompt_tokens=30), MODEL)  # released already: no-op
        seen.append(state(redis_url, "r"))
        return events, seen, units

    events, (before, after), units = run(redis_url, body)

    assert events == ["waiting=1", "settled", "fourth admitted"]
    assert before == {"limit": 350_000, "reserved": 300_000}  # waiting is not refused
    # The settlement taught 0.3 prompt tokens per worst-case token: 30,000 now.
    assert units == 30_000
    assert after == {"limit": 350_000, "spent": 30_000, "reserved": 130_000, "calls": 1}


def test_a_call_is_refused_at_once_only_when_the_limit_is_spent_and_the_last_one_goes(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> tuple[list[int], str]:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=0.00025))
        units = []
        for _ in range(3):  # 100,000 each; the third does not fit (300,000 > 250,000)
            hold = await budget.reserve(MODEL, body_of(93), 0)  # but nothing is in flight
            units.append(hold.units)
            await hold.settle(Usage(prompt_tokens=100), MODEL)
        with pytest.raises(BudgetExceededError) as refused:
            await in_step(None, budget.reserve(MODEL, body_of(93), 0), time.time() + 60)
        return units, str(refused.value)

    units, message = run(redis_url, body)

    assert units == [100_000] * 3
    # The last call went with 50,000 left and cost 100,000: the limit passed by half a call.
    assert state(redis_url, "r") == {"limit": 250_000, "spent": 300_000, "reserved": 0,
                                     "calls": 3, "refused": 1}
    assert "0.000300 USD spent of 0.000250" in message and "did not settle" not in message
    assert "run 'r'" in message and "rewardq budget set --usd" in message


def test_the_estimate_follows_the_peaks_of_real_usage_capped_by_the_call(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> tuple[list[int], dict[str, int]]:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=1.0))
        units = []

        async def call(prompt_bytes: int, max_tokens: int, usage: Usage) -> None:
            hold = await budget.reserve(MODEL, body_of(prompt_bytes), max_tokens)
            units.append(hold.units)
            await hold.settle(usage, MODEL)

        await call(93, 64, Usage(prompt_tokens=50, completion_tokens=10))  # worst: 164,000
        await call(93, 64, Usage(prompt_tokens=30, completion_tokens=40))  # 50 + 10 tokens
        await call(93, 64, Usage(prompt_tokens=30, completion_tokens=5))
        await call(93, 16, Usage(prompt_tokens=10, completion_tokens=3))
        await call(93, 64, Usage(prompt_tokens=10, completion_tokens=3))
        client_sync = redis.Redis.from_url(redis_url)
        learned = {k.decode(): int(v) for k, v in
                   client_sync.hgetall(budget_usage_key("r")).items()}
        client_sync.close()
        return units, learned

    units, learned = run(redis_url, body)

    # Per worst-case prompt token: 0.5, then 0.5 - (0.5 - 0.3)/16 = 0.4875 (down by 1/16 of
    # the gap), ...; reply tokens: 10, then 40 (a peak: at once), then 40 - 35/16, capped
    # at 16 by the fourth call's reply budget; each estimate rounds tokens up.
    assert units == [164_000, 60_000, 49_000 + 40_000, 48_000 + 16_000, 46_000 + 36_000]
    assert learned == {f"{MODEL}|prompt_ppm": 430_278, f"{MODEL}|reply_milli": 33_599}


def test_a_reply_over_the_worst_case_is_charged_but_never_reserved_above_it(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> list[int]:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=1.0))
        first = await budget.reserve(MODEL, body_of(93), 0)
        await first.settle(Usage(prompt_tokens=200), MODEL)  # a tokenizer above 1 per byte
        second = await budget.reserve(MODEL, body_of(93), 0)
        return [first.units, second.units]

    assert run(redis_url, body) == [100_000, 100_000]
    assert state(redis_url, "r")["spent"] == 200_000


def test_reasoning_tokens_are_priced_once_as_part_of_the_completion(redis_url: str) -> None:
    prices = PriceTable({MODEL: [1.0, 4.0]})

    async def body(client: aioredis.Redis) -> int:
        budget = FleetBudget(client, "r", prices, limits=BudgetLimits(usd=1.0))
        hold = await budget.reserve(MODEL, body_of(93), 8192)
        await hold.settle(Usage(prompt_tokens=40, completion_tokens=700,
                                reasoning_tokens=650), MODEL)
        second = await budget.reserve(MODEL, body_of(93), 8192)
        return second.units

    estimate = run(redis_url, body)

    assert state(redis_url, "r")["spent"] == 40 * 1000 + 700 * 4000
    assert estimate == 40 * 1000 + 700 * 4000  # learned: 700 completion tokens, not 8,192


def test_a_step_limit_holds_per_step_and_the_run_limit_across_steps(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> dict[int | None, int]:
        budget = FleetBudget(client, "r", PRICES,
                             limits=BudgetLimits(usd=0.00045, step_usd=0.00025))
        admitted: dict[int | None, int] = {}
        for step in (1, 2, None, 3):
            admitted[step] = 0
            try:
                for _ in range(10):
                    hold = await in_step(step, budget.reserve(MODEL, body_of(93), 0))
                    await hold.settle(Usage(prompt_tokens=100), MODEL)
                    admitted[step] += 1
            except BudgetExceededError:
                pass
        return admitted

    admitted = run(redis_url, body)

    # step 1: 3 (the third is its last call: 200,000 spent < 250,000), step 2: 2 more
    # (the run's last call at 400,000 < 450,000), then the run's limit is spent
    assert admitted == {1: 3, 2: 2, None: 0, 3: 0}
    s = state(redis_url, "r")
    assert (s["spent"], s["s:1:spent"], s["s:2:spent"]) == (500_000, 300_000, 200_000)
    assert (s["s:1:refused"], s["s:2:refused"], s["s:3:refused"], s["refused"]) == (1, 1, 1, 4)


def test_waiting_calls_go_in_their_order_as_room_is_freed(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> tuple[list[int], list[int]]:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=0.0003))
        holds = [await budget.reserve(MODEL, body_of(93), 0) for _ in range(3)]
        admitted: list[int] = []
        after_each: list[int] = []

        async def waiter(i: int) -> BudgetHold:
            hold = await budget.reserve(MODEL, body_of(93), 0)
            admitted.append(i)
            return hold

        tasks = []
        for i in range(5):  # queued one after the other
            tasks.append(asyncio.create_task(waiter(i)))
            while budget.waiting < i + 1:
                await asyncio.sleep(0.005)
        for hold in holds:  # each release frees one worst case: one waiter goes
            await hold.release()
            await asyncio.sleep(0.1)
            after_each.append(len(admitted))
        for task in tasks[:3]:
            await (await task).release()
        await asyncio.gather(*tasks[3:])
        return admitted, after_each

    admitted, after_each = run(redis_url, body)

    assert admitted == [0, 1, 2, 3, 4]
    assert after_each == [1, 2, 3]


def test_the_waiting_calls_of_a_process_ask_redis_through_the_first_of_them_only(
        redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    def scripts_run() -> int:
        stats = sync.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
                   for name in ("eval", "evalsha"))

    async def body(_: aioredis.Redis) -> tuple[int, list[int]]:
        # A bounded pool, as a worker's: 100 callers share 16 connections.
        client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=16))
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=0.00015))
        stuck = await budget.reserve(MODEL, body_of(93), 0)  # 100,000 in flight
        admitted: list[int] = []

        async def waiter(i: int) -> BudgetHold:
            hold = await budget.reserve(MODEL, body_of(93), 0)
            admitted.append(i)
            return hold

        tasks = [asyncio.create_task(waiter(i)) for i in range(100)]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 60  # a loaded host is slow, never wrong
        while budget.waiting < 100 and loop.time() < give_up:
            await asyncio.sleep(0.01)  # each asks once, finds no room, and queues
        assert budget.waiting == 100
        before = scripts_run()
        await asyncio.sleep(0.5)  # the first asks again every 20 ms; the 99 behind it, never
        asked = scripts_run() - before
        set_limits(sync, "r", usd=1.0)
        for hold in await asyncio.gather(*tasks):
            await hold.release()
        await stuck.release()
        await client.aclose()
        return asked, admitted

    asked, admitted = run(redis_url, body)
    sync.close()

    assert asked <= 0.5 / 0.02 + 2  # one ask per poll, not one per waiting call
    assert sorted(admitted) == list(range(100))  # every one went once the limit was raised


def test_a_call_waits_at_most_until_its_deadline_and_a_raised_limit_lets_waiters_go(
        redis_url: str) -> None:
    sync = redis.Redis.from_url(redis_url)

    async def body(client: aioredis.Redis) -> tuple[str, int]:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=0.00015))
        stuck = await budget.reserve(MODEL, body_of(93), 0)  # never settles
        with pytest.raises(BudgetExceededError) as gave_up:
            await in_step(3, budget.reserve(MODEL, body_of(93), 0), time.time() + 0.3)
        waiting = asyncio.create_task(budget.reserve(MODEL, body_of(93), 0))
        await asyncio.sleep(0.2)
        set_limits(sync, "r", usd=1.0)  # `rewardq budget set`: no settlement needed
        hold = await waiting
        await stuck.release()
        await hold.release()
        return str(gave_up.value), budget.waiting

    message, left_waiting = run(redis_url, body)
    sync.close()

    assert "did not settle within the call's deadline" in message
    assert "0.000100 in flight of 0.000150" in message
    assert left_waiting == 0
    assert state(redis_url, "r") == {"limit": 1_000_000_000, "spent": 0, "reserved": 0,
                                     "refused": 1, "s:3:refused": 1}


def test_concurrent_callers_on_several_clients_leave_nothing_unspent_at_the_cap(
        redis_url: str) -> None:
    rng = random.Random(13)
    charged: list[int] = []
    refusals: list[str] = []

    async def caller(budget: FleetBudget, n: int) -> None:
        for _ in range(n):
            worst = rng.randrange(1, 400)
            try:
                hold = await in_step(rng.choice([1, 2]),
                                     budget.reserve(MODEL, body_of(worst), 0))
            except BudgetExceededError as exc:
                refusals.append(str(exc))
                continue
            await asyncio.sleep(rng.random() / 200)
            if rng.random() < 0.2:
                await hold.release()
                continue
            used = rng.randrange(0, worst + 8)  # never above the worst case (worst + 7)
            await hold.settle(Usage(prompt_tokens=used), MODEL)
            charged.append(used * 1000)

    async def body(client: aioredis.Redis) -> None:
        others = [aioredis.Redis.from_url(redis_url) for _ in range(3)]
        try:
            budgets = [FleetBudget(c, "r", PRICES, limits=BudgetLimits(usd=0.02))
                       for c in [client, *others]]
            await asyncio.gather(*(caller(budgets[i % 4], 40) for i in range(16)))
        finally:
            for other in others:
                await other.aclose()

    run(redis_url, body)

    s = state(redis_url, "r")
    assert refusals and charged  # the limit was reached, and calls were made
    assert all("did not settle" not in r for r in refusals)  # refused: the limit was spent
    assert s["spent"] == sum(charged) >= 20_000_000  # nothing left unspent at the cap
    # Past it by at most what the 16 calls in flight cost beyond their estimates.
    assert s["spent"] - 20_000_000 < 16 * 407_000
    assert s["reserved"] == 0 and s["s:1:reserved"] == 0 and s["s:2:reserved"] == 0
    assert s["s:1:spent"] + s["s:2:spent"] == s["spent"]
    assert s["calls"] == len(charged) and s["refused"] == len(refusals)


def test_an_abandoned_hold_is_charged_its_worst_case_and_a_late_settle_corrects_it(
        redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> list[dict[str, int]]:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=1.0),
                             hold_ttl_s=0.05)
        # Learn 0.5 prompt tokens per worst-case prompt token: holds reserve half their worst.
        teach = await budget.reserve(MODEL, body_of(93), 0)
        await teach.settle(Usage(prompt_tokens=50), MODEL)
        abandoned = await in_step(4, budget.reserve(MODEL, body_of(93), 0))  # 50,000 held
        late = await in_step(4, budget.reserve(MODEL, body_of(193), 0))  # 100,000 held
        await asyncio.sleep(0.3)  # both holds expire (Redis time)
        seen = []
        fresh = await budget.reserve(MODEL, body_of(93), 0)  # this reserve sweeps them
        seen.append(state(redis_url, "r"))
        await late.settle(Usage(prompt_tokens=50), MODEL)
        await fresh.release()
        seen.append(state(redis_url, "r"))
        assert (abandoned.units, abandoned.worst, late.units, late.worst) == (
            50_000, 100_000, 100_000, 200_000)
        return seen

    swept, settled = run(redis_url, body)

    # Charged their worst cases (100,000 + 200,000) on top of the 50,000 taught.
    assert (swept["spent"], swept["s:4:spent"], swept["s:4:reserved"]) == (350_000, 300_000, 0)
    assert swept["reserved"] == 50_000  # the fresh hold alone
    # The late settle: 50,000 instead of its 200,000 worst case.
    assert (settled["spent"], settled["s:4:spent"], settled["reserved"]) == (200_000, 150_000, 0)
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(budget_holds_key("r")) == 0
    client.close()


def test_amounts_past_the_precision_of_luas_number_formatting_stay_exact(
        redis_url: str) -> None:
    dear = PriceTable({MODEL: [1e6, 1e6]})  # one token: one dollar, 10^9 nano-USD

    async def body(client: aioredis.Redis) -> None:
        budget = FleetBudget(client, "r", dear, limits=BudgetLimits(usd=3e6))
        for _ in range(3):  # worst case 100,007 tokens: 1.00007e14 nano-USD each
            hold = await in_step(2, budget.reserve(MODEL, body_of(100_000), 0))
            await hold.settle(Usage(prompt_tokens=99_999), MODEL)

    run(redis_url, body)

    s = state(redis_url, "r")
    assert (s["spent"], s["s:2:spent"]) == (3 * 99_999 * 10**9, 3 * 99_999 * 10**9)
    assert (s["reserved"], s["limit"], s["calls"]) == (0, 3 * 10**15, 3)


def test_a_model_without_a_price_is_neither_limited_nor_counted(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=1e-9))
        for _ in range(5):
            hold = await budget.reserve("unpriced-model", body_of(10_000), 64)
            await hold.settle(Usage(prompt_tokens=3000, completion_tokens=64), "unpriced")

    run(redis_url, body)

    client = redis.Redis.from_url(redis_url)
    assert client.keys("rewardq:budget*") == []
    client.close()


def test_the_settings_seed_a_limit_only_where_redis_has_none(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis.from_url(redis_url)
    set_limits(client, "cli-set", usd=2.0)

    async def body(aclient: aioredis.Redis) -> None:
        for run_name in ("cli-set", "fresh"):
            budget = FleetBudget(aclient, run_name, PRICES,
                                 limits=BudgetLimits(usd=0.5, step_usd=0.1))
            await budget.reserve(MODEL, body_of(93), 0)
            await budget.reserve(MODEL, body_of(93), 0)

    async def after_data_loss(aclient: aioredis.Redis) -> None:
        await aclient.flushdb()
        budget = FleetBudget(aclient, "fresh", PRICES, limits=BudgetLimits(usd=0.5))
        await budget.reserve(MODEL, body_of(93), 0)

    with caplog.at_level(logging.WARNING, logger="rewardq.workers.budget"):
        run(redis_url, body)

    assert read_budget(client, "cli-set").limit_usd == 2.0  # the CLI's word stands
    assert read_budget(client, "cli-set").step_limit_usd == 0.1  # it had no step limit
    fresh = read_budget(client, "fresh")
    assert (fresh.limit_usd, fresh.step_limit_usd, fresh.reserved_usd) == (0.5, 0.1, 0.0002)
    assert caplog.text.count("run 'cli-set' is 2 USD, not REWARDQ_BUDGET_USD=0.5") == 1
    assert "'fresh'" not in caplog.text
    assert {m.decode() for m in client.smembers("rewardq:budget:runs")} == {"cli-set",
                                                                            "fresh"}
    run(redis_url, after_data_loss)  # Redis restarted empty: the next call seeds again
    assert read_budget(client, "fresh").limit_usd == 0.5
    assert {m.decode() for m in client.smembers("rewardq:budget:runs")} == {"fresh"}
    client.close()


def test_an_unreachable_redis_is_an_outage_never_budget_exceeded() -> None:
    async def body() -> BaseException:
        client = aioredis.Redis(port=free_port(), socket_connect_timeout=1)
        budget = FleetBudget(client, "r", PRICES, limits=BudgetLimits(usd=1.0))
        try:
            await budget.reserve(MODEL, body_of(93), 0)
        except BaseException as exc:  # noqa: BLE001 - the test inspects what came out
            return exc
        finally:
            await client.aclose()
        raise AssertionError("reserve went through without Redis")

    error = asyncio.run(body())

    assert isinstance(error, BrokerUnavailableError) and isinstance(error, OUTAGE_ERRORS)
    assert not isinstance(error, BudgetExceededError)


@given(st.lists(st.text(max_size=300), min_size=1, max_size=4), st.integers(0, 512),
       st.integers(1, 4))
def test_the_worst_case_bounds_the_local_judges_token_count(
        texts: list[str], max_tokens: int, n: int) -> None:
    messages = [{"role": "user", "content": t} for t in texts]
    prompt, completion = worst_case_tokens({"messages": messages, "n": n}, max_tokens)
    assert prompt >= prompt_tokens(messages) and prompt >= sum(len(t) for t in texts)
    assert completion == max_tokens * n
    price = Price(0.15, 0.6)
    assert cost_units(price, prompt, completion) >= cost_units(price, prompt - 1, completion)


# -- the CLI, stats and metrics ------------------------------------------------------------


def run_cli(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    """``rewardq <argv>`` in a child process with ``settings`` in its environment."""
    return subprocess.run([sys.executable, "-m", "rewardq.cli", *argv],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=120)


def test_cli_sets_shows_and_resets_a_budget_and_the_metrics_read_it(
        redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, budget_run="cli")
    set_run = run_cli(settings, "budget", "set", "--usd", "1.25", "--step-usd", "0.5")

    async def spend(client: aioredis.Redis) -> None:
        budget = FleetBudget(client, "cli", PRICES)
        hold = await in_step(7, budget.reserve(MODEL, body_of(93), 0))
        await hold.settle(Usage(prompt_tokens=80), MODEL)
        await budget.reserve(MODEL, body_of(193), 0)  # in flight

    run(redis_url, spend)
    shown = run_cli(settings, "budget", "show", "--json")
    unlimit = run_cli(settings, "budget", "set", "--run", "cli", "--step-usd", "none")
    families = {f.name: f for f in FleetCollector(redis.Redis.from_url(redis_url)).collect()}
    reset = run_cli(settings, "budget", "reset")
    after = json.loads(run_cli(settings, "budget", "show", "--json").stdout)
    bad = run_cli(settings, "budget", "set", "--usd", "-3")
    nothing = run_cli(settings, "budget", "set")

    assert set_run.returncode == 0, set_run.stderr
    assert "limit           1.250000 USD" in set_run.stdout
    got = json.loads(shown.stdout)
    assert (got["run"], got["limit_usd"], got["step_limit_usd"]) == ("cli", 1.25, 0.5)
    assert got["spent_usd"] == pytest.approx(0.00008) and got["calls"] == 1
    assert got["reserved_usd"] == pytest.approx(0.00016)  # 200 worst-case tokens x 0.8 learned
    assert got["steps"]["7"]["spent_usd"] == pytest.approx(0.00008)
    assert got["remaining_usd"] == pytest.approx(1.25 - 0.00024)
    assert unlimit.returncode == 0 and "step limit      unlimited" in unlimit.stdout

    def sample(name: str) -> float:
        [s] = [s for s in families[name].samples if s.labels == {"run": "cli"}]
        return float(s.value)

    assert sample("rewardq_fleet_budget_spent_usd") == pytest.approx(0.00008)
    assert sample("rewardq_fleet_budget_reserved_usd") == pytest.approx(0.00016)
    assert sample("rewardq_fleet_budget_limit_usd") == 1.25
    assert families["rewardq_fleet_budget_step_limit_usd"].samples == []  # unlimited now
    assert reset.returncode == 0, reset.stderr
    assert (after["spent_usd"], after["calls"], after["limit_usd"]) == (0.0, 0, 1.25)
    assert after["reserved_usd"] == pytest.approx(0.00016)  # the call in flight still holds
    assert bad.returncode == 2 and "must be > 0" in bad.stderr
    assert nothing.returncode == 2 and "--usd" in nothing.stderr


def test_cli_says_so_in_one_line_when_redis_is_unreachable() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for argv in (("budget", "show"), ("budget", "set", "--usd", "3")):
        done = run_cli(settings, *argv)
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


# -- acceptance: half the budget a run needs, on real workers -------------------------------

#: The acceptance's fleet: 4 worker processes x 256 judge calls in flight each, and as many
#: items as calls: the first settlements come only after every call has asked for its share.
PROCESSES, SLOTS = 4, 256
ITEMS = PROCESSES * SLOTS
#: "A few calls' real cost": how far from the limit a capped run may end, either way.
FEW_CALLS = 3
#: (judge profile, judge model): a plain judge, and an OpenAI reasoning model by name alone
#: (max_completion_tokens of 8,192 sent, ~1,000 reasoning tokens spent per reply).
JUDGES = [("plain", Settings().judge_model), ("openai-reasoning", "gpt-5-mini")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("profile", "model"), JUDGES, ids=[p for p, _ in JUDGES])
def test_a_run_with_half_its_budget_spends_it_all_and_a_replay_scores_every_refused_item(
        settings: Settings, workers, judge_profile, tmp_path, profile: str,
        model: str) -> None:
    judge: JudgeProcess = judge_profile(profile)
    priced = settings.model_copy(update={
        "judge_model": model, "judge_prices": {model: (3.0, 15.0)}, "budget_run": "half",
        "chunk_size": 64, "max_concurrent_requests": SLOTS})
    price = PriceTable.from_settings(priced).price(model)
    assert price is not None
    items = make_items(ITEMS, f"budget-{profile}")
    with SyncJudge(priced) as sync_judge:  # what each item really costs on this judge
        reference = sync_judge.score(items)
    assert all(r.status is ResultStatus.OK for r in reference)
    usage = {r.id: r.usage or Usage() for r in reference}
    cost = {i: cost_units(price, u.prompt_tokens, u.completion_tokens) for i, u in usage.items()}
    total, few = sum(cost.values()), FEW_CALLS * max(cost.values())
    limit = total // 2
    judge.configure(latency_ms=100, jitter_ms=50)  # calls overlap: 1,024 in flight
    judge.reset_stats()
    started = workers(PROCESSES, judge_model=model, judge_prices=priced.judge_prices,
                      budget_run="half", budget_usd=units_to_usd(limit),
                      max_concurrent_requests=SLOTS)

    with RewardClient(priced) as client:
        results = client.submit(items, step=1).result(timeout=180)
    calls = judge.stats()["requests_total"]
    rclient = redis.Redis.from_url(priced.broker_url)
    during = read_budget(rclient, "half", steps=True)
    letters = DeadLetters.from_settings(priced)
    lettered = letters.list()
    families = {f.name: f for f in FleetCollector(rclient).collect()}
    shown = io.StringIO()
    run_stats(priced, once=True, out=shown)

    ok = [r for r in results if r.status is ResultStatus.OK]
    refused = [r for r in results if r.status is ResultStatus.BUDGET_EXCEEDED]
    spent = round(during.spent_usd * BUDGET_UNITS_PER_USD)
    assert ok and refused and len(ok) + len(refused) == len(items), worker_logs(tmp_path)[-3000:]
    assert all(r.score is None and "budget" in (r.error or "") for r in refused)
    assert all("did not settle" not in (r.error or "") for r in refused)  # none timed out
    assert spent == sum(cost[r.id] for r in ok)  # settled at the replies' real usage
    # The cap: refused only once the limit was spent, and past it by a few calls at most.
    assert limit <= spent <= limit + few
    assert during.reserved_usd == 0 and during.calls == len(ok) == calls
    assert during.refused == len(refused)
    assert during.steps[1].spent_usd == during.spent_usd  # charged to the chunks' step
    assert sorted(letter.item_id or "" for letter in lettered) == sorted(r.id for r in refused)
    assert {letter.reason for letter in lettered} == {"budget_exceeded"}
    [spent_sample] = families["rewardq_fleet_budget_spent_usd"].samples
    [limit_sample] = families["rewardq_fleet_budget_limit_usd"].samples
    assert spent_sample.value == during.spent_usd and limit_sample.labels == {"run": "half"}
    assert limit_sample.value == units_to_usd(limit)
    [line] = [ln for ln in shown.getvalue().splitlines() if ln.startswith("budget")]
    assert f"{during.spent_usd:,.4f} USD spent of {units_to_usd(limit):,.4f}" in line
    assert f"refused {len(refused)}" in line

    # Raised to exactly a full run's cost, without a restart (the same worker processes),
    # then replayed: the refused items cost what is left, to the nano-dollar.
    raised = run_cli(priced, "budget", "set", "--usd", repr(units_to_usd(total)))
    judge.reset_stats()
    replayed = run_cli(priced, "failed", "replay", "--all", "--wait", "120")
    after = read_budget(rclient, "half")
    replay_calls = judge.stats()["requests_total"]
    with RewardClient(priced) as client:
        follow_up = client.submit(items, step=2)
        cached = follow_up.result(timeout=60)
    left = letters.list()
    letters.close()
    rclient.close()

    assert all(p.poll() is None for p in started)
    assert raised.returncode == 0, raised.stderr
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert f"outcome: ok={len(refused)}" in replayed.stdout, replayed.stdout
    assert replay_calls == len(refused) and left == []
    # Every item judged exactly once over both passes: the spend is the whole run's cost.
    assert round(after.spent_usd * BUDGET_UNITS_PER_USD) == total
    assert after.reserved_usd == 0 and after.calls == len(items)
    assert follow_up.chunk_count == 0
    assert [r.score for r in cached] == [expected(i)[0] for i in items]
