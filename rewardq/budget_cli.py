"""``rewardq budget show | set | reset``: the fleet's judge budget by hand.

The budget of a run (``REWARDQ_BUDGET_RUN``, or ``--run``) lives in one Redis hash
(``rewardq.broker.keys.budget_key``; the workers' side is ``rewardq.workers.budget``): its
limits, what was spent and what is reserved by the calls in flight, in integer nano-dollars. ``set``
changes a limit for the whole fleet at once, no restart: the next call of every worker
reads it, so after raising it ``rewardq failed replay --all`` scores the items that came
back ``budget_exceeded``. ``reset`` zeroes the spend of a run (its limits and the
reservations in flight stay), e.g. to reuse a run name. A Redis that cannot be reached
is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import redis

from rewardq.broker.connections import redis_client
from rewardq.broker.errors import BrokerUnavailableError
from rewardq.broker.keys import BUDGET_RUNS, BUDGET_TTL_S, BUDGET_UNITS_PER_USD, budget_key
from rewardq.broker.settings import Settings

#: Steps ``show`` lists (the latest ones); ``--json`` has them all.
SHOWN_STEPS = 10
UNLIMITED = "none"

RESET_LUA = """
--[[
Zero a run's spend: KEYS[1] rewardq:budget:run:<run> HASH (see workers/budget.py). Deletes
spent, calls, refused and every s:<step>:spent / s:<step>:refused, and the per-step
reserved fields that are 0; keeps the limits and the reservations of calls in flight.
Returns how many fields were deleted.
]]
local deleted = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local zero = string.match(f, '^s:.*:reserved$') and
      tonumber(redis.call('HGET', KEYS[1], f)) == 0
  if f == 'spent' or f == 'calls' or f == 'refused' or zero or
      string.match(f, '^s:.*:spent$') or string.match(f, '^s:.*:refused$') then
    deleted = deleted + redis.call('HDEL', KEYS[1], f)
  end
end
return deleted
"""


@dataclass(frozen=True)
class StepSpend:
    """One training step's spend, in US dollars, and its calls refused."""

    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    refused: int = 0


@dataclass(frozen=True)
class BudgetState:
    """A run's judge budget as Redis holds it (amounts in US dollars).

    Attributes:
        run: the run's name.
        limit_usd: the run's limit (``None``: unlimited).
        step_limit_usd: every step's limit (``None``: unlimited).
        spent_usd: settled spend of the run.
        reserved_usd: the estimates of the calls in flight.
        calls: judge calls settled.
        refused: judge calls refused for the budget.
        steps: step -> its spend (only when read with ``steps=True``).
    """

    run: str
    limit_usd: float | None = None
    step_limit_usd: float | None = None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    calls: int = 0
    refused: int = 0
    steps: dict[int, StepSpend] = field(default_factory=dict)

    @property
    def limited(self) -> bool:
        """Whether the run or its steps have a limit."""
        return self.limit_usd is not None or self.step_limit_usd is not None

    @property
    def remaining_usd(self) -> float | None:
        """What the run may still spend beyond its spend and reservations (``None``:
        unlimited)."""
        if self.limit_usd is None:
            return None
        return max(0.0, self.limit_usd - self.spent_usd - self.reserved_usd)


def read_budget(client: redis.Redis, run: str, *, steps: bool = False) -> BudgetState:
    """The budget of ``run`` (all zero and unlimited when Redis has none).

    Args:
        client: a Redis client on the fleet's database.
        run: the run's name.
        steps: also read every step's spend (one ``HGETALL``; else one ``HMGET``).

    Raises:
        BrokerUnavailableError: Redis could not be reached.
    """
    names = ["limit", "step_limit", "spent", "reserved", "calls", "refused"]
    try:
        if steps:
            raw = {_text(k) or "": _text(v) for k, v in client.hgetall(budget_key(run)).items()}
        else:
            raw = dict(zip(names, (_text(v) for v in client.hmget(budget_key(run), names)),
                           strict=True))
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"judge budget of run {run!r}: {exc}") from exc
    return BudgetState(
        run=run, limit_usd=_usd(raw.get("limit")), step_limit_usd=_usd(raw.get("step_limit")),
        spent_usd=_usd(raw.get("spent")) or 0.0, reserved_usd=_usd(raw.get("reserved")) or 0.0,
        calls=_int(raw.get("calls")), refused=_int(raw.get("refused")),
        steps=_steps(raw) if steps else {})


def set_limits(client: redis.Redis, run: str, *, usd: float | None | str = None,
               step_usd: float | None | str = None) -> None:
    """Set the run's limit and/or every step's limit for the whole fleet.

    Args:
        client: a Redis client on the fleet's database.
        run: the run's name.
        usd: the run's new limit in US dollars; ``"none"`` removes it; ``None`` keeps it.
        step_usd: every step's new limit, the same way.

    Raises:
        ValueError: a limit that is not a positive finite number or ``"none"``.
        BrokerUnavailableError: Redis could not be reached.
    """
    updates: dict[str, str] = {}
    for name, value in (("limit", usd), ("step_limit", step_usd)):
        if value is None:
            continue
        if value == UNLIMITED:
            updates[name] = UNLIMITED
        elif isinstance(value, int | float) and math.isfinite(value) and value > 0:
            updates[name] = str(round(value * BUDGET_UNITS_PER_USD))
        else:
            raise ValueError(f"a budget is a positive number of US dollars or "
                             f"{UNLIMITED!r}, got {value!r}")
    if not updates:
        return
    try:
        with client.pipeline(transaction=True) as pipe:
            for name, stored in updates.items():
                pipe.hset(budget_key(run), name, stored)
            pipe.sadd(BUDGET_RUNS, run)
            pipe.expire(budget_key(run), BUDGET_TTL_S)
            pipe.execute()
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"judge budget of run {run!r}: {exc}") from exc


def reset_spend(client: redis.Redis, run: str) -> None:
    """Zero the run's spend and refusals (limits and reservations in flight stay).

    Raises:
        BrokerUnavailableError: Redis could not be reached.
    """
    try:
        client.eval(RESET_LUA, 1, budget_key(run))
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"judge budget of run {run!r}: {exc}") from exc


def render_budget(state: BudgetState) -> str:
    """``rewardq budget show``'s text."""
    limit = "unlimited" if state.limit_usd is None else f"{state.limit_usd:,.6f} USD"
    step_limit = "unlimited" if state.step_limit_usd is None \
        else f"{state.step_limit_usd:,.6f} USD"
    remaining = state.remaining_usd
    lines = [f"run             {state.run}",
             f"limit           {limit}",
             f"step limit      {step_limit}",
             f"spent           {state.spent_usd:,.6f} USD"
             + (f" ({state.spent_usd / state.limit_usd:.1%})" if state.limit_usd else ""),
             f"in flight       {state.reserved_usd:,.6f} USD reserved (worst cases)",
             "remaining       " + ("-" if remaining is None else f"{remaining:,.6f} USD"),
             f"calls           {state.calls:,} settled   {state.refused:,} refused"]
    if state.steps:
        shown = sorted(state.steps)[-SHOWN_STEPS:]
        lines += ["", f"{'step':>8} {'spent USD':>14} {'in flight USD':>14} {'refused':>8}"]
        lines += [f"{step:>8} {state.steps[step].spent_usd:>14,.6f} "
                  f"{state.steps[step].reserved_usd:>14,.6f} {state.steps[step].refused:>8,}"
                  for step in shown]
        if len(state.steps) > len(shown):
            lines.append(f"(the last {len(shown)} of {len(state.steps)} steps; --json lists "
                         f"all)")
    return "\n".join(lines)


def add_budget_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``budget`` and its subcommands on ``rewardq``'s subparsers.

    Each subcommand sets ``func(args, settings) -> int`` (the exit status).
    """
    budget = subparsers.add_parser("budget", help="show, set or reset the judge budget")
    actions = budget.add_subparsers(dest="budget_command", required=True)

    def with_run(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--run", default=None,
                            help="the run (default REWARDQ_BUDGET_RUN, else 'default')")
        return parser

    show = with_run(actions.add_parser("show", help="limits, spend and calls refused"))
    show.add_argument("--json", action="store_true", help="as one JSON object")
    show.set_defaults(func=_show)

    change = with_run(actions.add_parser(
        "set", help="change the limits for the whole fleet (no restart)",
        description="Set the run's and/or every step's limit in US dollars ('none' "
                    "removes one). Every worker reads it at its next call; then `rewardq "
                    "failed replay --all` scores the items that came back budget_exceeded."))
    change.add_argument("--usd", type=_limit, default=None, metavar="USD",
                        help="the run's limit in US dollars, or 'none'")
    change.add_argument("--step-usd", type=_limit, default=None, metavar="USD",
                        help="each training step's limit in US dollars, or 'none'")
    change.set_defaults(func=_set)

    reset = with_run(actions.add_parser(
        "reset", help="zero the run's spend (limits and calls in flight stay)"))
    reset.set_defaults(func=_reset)
    return budget


def _limit(text: str) -> float | str:
    if text.strip().lower() == UNLIMITED:
        return UNLIMITED
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of US dollars: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a budget must be > 0 US dollars, got {text!r}")
    return value


def _show(args: argparse.Namespace, settings: Settings) -> int:
    client = redis_client(settings)
    try:
        state = read_budget(client, args.run or settings.budget_run, steps=True)
    finally:
        client.close()
    if args.json:
        print(json.dumps(asdict(state) | {"remaining_usd": state.remaining_usd}))
    else:
        print(render_budget(state))
    return 0


def _set(args: argparse.Namespace, settings: Settings) -> int:
    if args.usd is None and args.step_usd is None:
        print("error: give --usd and/or --step-usd", file=sys.stderr)
        return 2
    run = args.run or settings.budget_run
    client = redis_client(settings)
    try:
        set_limits(client, run, usd=args.usd, step_usd=args.step_usd)
        state = read_budget(client, run)
    finally:
        client.close()
    print(render_budget(state))
    return 0


def _reset(args: argparse.Namespace, settings: Settings) -> int:
    run = args.run or settings.budget_run
    client = redis_client(settings)
    try:
        reset_spend(client, run)
        state = read_budget(client, run)
    finally:
        client.close()
    print(render_budget(state))
    return 0


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else None if value is None \
        else str(value)


def _int(raw: str | None) -> int:
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


def _usd(raw: str | None) -> float | None:
    """Stored nano-USD as US dollars; ``None`` when absent or ``"none"``."""
    try:
        return int(raw) / BUDGET_UNITS_PER_USD if raw is not None else None
    except ValueError:
        return None


def _steps(raw: Mapping[str, str | None]) -> dict[int, StepSpend]:
    found: dict[int, dict[str, str | None]] = {}
    for name, value in raw.items():
        parts = name.split(":")
        if len(parts) == 3 and parts[0] == "s":
            try:
                found.setdefault(int(parts[1]), {})[parts[2]] = value
            except ValueError:
                continue
    return {step: StepSpend(spent_usd=_usd(fields.get("spent")) or 0.0,
                            reserved_usd=_usd(fields.get("reserved")) or 0.0,
                            refused=_int(fields.get("refused")))
            for step, fields in sorted(found.items())}
