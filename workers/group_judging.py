"""Group judging: a GRPO group's members judged together, wherever they arrive.

With ``JudgeSpec.group`` set, the items sharing a ``uid`` are judged relative to each
other (``rewardq.judge.group_prompts``): ``listwise``, one call scores the whole group;
``pairwise``, every pair of members is judged in both orders (position swap), a member's
score is its share of wins (ties half) and its ``agreement`` the share of its pairs whose
two orders named the same winner.

The members of a group reach the fleet in different chunks, on different worker
processes. Each one registers in the group's Redis hash (``rewardq.broker.keys``:
``rewardq:judgegroup:<sha256>``, a group rendezvous, ``rewardq.broker.rendezvous``)
under its item id; the arrival that completes the group (``JudgeSpec.group.size``
distinct item ids) seals the member list and takes the group's lease, both atomically in
one Lua call. That process makes the group's calls through ``JudgeClient.complete``
(slots, rate limiter, usage), retried by ``rewardq.workers.retry``, and stores every
member's verdict in the verdict cache under its fingerprint
(``rewardq.broker.keys.judge_fingerprint``, which carries the group mode, size and uid),
all in one Lua call. The other members, in this process or another, poll until their
verdict is cached or their chunk's deadline passes (then ``timeout``, with how many
members had arrived; never a hang).

The lease is a token-owned lease (``rewardq.workers.leases``), renewed every third of
``Settings.inflight_lock_ttl_s`` while the calls run.
An owner that dies stops renewing: once the lease lapses, the next waiting member's poll
takes the group over (the items are in the hash) and judges it. An owner whose calls
fail for good releases the lease and its process's members come back ``failed`` (or
``budget_exceeded``); a member waiting elsewhere then takes over and tries once more,
like a single item's waiter (``rewardq.workers.scoring``).

Members and identical resubmissions: a member is an item id; the same id arriving again
(a redelivered chunk, a replay) counts once, and two ids with the same text (two
rollouts that wrote the same answer) are two members that share one verdict. An item
without a ``uid`` comes back ``invalid``: it has no group to be judged in, and a score
relative to nobody would be a different quantity from its neighbours' in the batch. An
item that arrives after its group was sealed with other members (more members than the
configured size) is ``invalid`` as well, and so is a group whose members differ in
prompt or reference (one group is one prompt's rollouts).

Waiting members hold their chunk's task slot: a step whose groups are split over more
chunks than the fleet runs at once (``worker_concurrency`` x processes) can wait until
the deadline. Keep a group's items close together in the batch (GRPO batches are).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis

from rewardq.broker.connections import is_outage, reply_text
from rewardq.broker.errors import JudgeError, JudgeErrorKind, UnparseableReplyError
from rewardq.broker.keys import cache_key, judge_fingerprint, judge_group_key, judge_group_lock_key
from rewardq.broker.rendezvous import RENDEZVOUS_LUA
from rewardq.broker.schemas import (
    GroupSpec,
    JudgeSpec,
    JudgeVerdict,
    ResultStatus,
    ScoreChunk,
    ScoreItem,
    ScoreResult,
    Usage,
)
from rewardq.judge.group_prompts import (
    Winner,
    labels,
    listwise_max_tokens,
    listwise_request,
    pairwise_request,
    parse_listwise,
    parse_pairwise,
    presentation_order,
)
from rewardq.judge.judge_request import reply_budget
from rewardq.judge.rollout_view import GROUP_NO_ANSWER
from rewardq.judge.verdicts import normalize
from rewardq.monitoring.metrics import WorkerMetrics, call_status
from rewardq.workers.cache import DEFAULT_MAX_MEMORY_RATIO, MAKE_ROOM, run_making_room
from rewardq.workers.judge_client import TimedReply
from rewardq.workers.leases import LEASE_LUA, Leases
from rewardq.workers.retry import RetryPolicy, decide
from rewardq.workers.scoring import JudgeFailed, Outcome

__all__ = ["GroupCaller", "GroupInvalid", "GroupJudging", "GroupTimeout", "PairScore",
           "pairwise_scores"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a member's result waits past its deadline for the member's own, more
#: telling, timeout error (how many members had arrived) before a generic one.
_RESULT_GRACE_S = 1.0

# Join (or poll) a group for one member; the one place a group is completed and taken.
# Makes room first, as the verdict cache's claim does (rewardq.workers.cache.MAKE_ROOM).
# KEYS[1] group hash, KEYS[2] group lease (a token-owned lease,
# rewardq.workers.leases), KEYS[3] the member's cache key, KEYS[4] the cache evictions
# counter. ARGV: item id, member fingerprint, item JSON, group size, hash TTL s, token,
# lease ms, joining process, cache_max_memory_ratio.
# The hash is a group rendezvous (rewardq.broker.rendezvous) whose members are item ids:
# m:<id> -> fingerprint, n -> distinct ids, sealed -> JSON {fingerprint: ids} (written
# once, when complete); and p:<fp> -> item JSON, w:<id> -> the process that brought it.
# Returns {state, payload}: cached (verdict JSON), waiting (ids so far), late (seal),
# owner (seal: the lease is now ours), busy (seal: another holds the lease).
_JOIN = MAKE_ROOM + LEASE_LUA + RENDEZVOUS_LUA + """
make_room(tonumber(ARGV[9]), 1, KEYS[4])
local v = redis.call('GET', KEYS[3])
if v then return {'cached', v} end
local h, id, fp = KEYS[1], ARGV[1], ARGV[2]
local new, n = join_group(h, id, fp, ARGV[5])
if new then redis.call('HSET', h, 'w:' .. id, ARGV[8]) end
redis.call('HSETNX', h, 'p:' .. fp, ARGV[3])
local sealed = redis.call('HGET', h, 'sealed')
if not sealed then
  if n < tonumber(ARGV[4]) then return {'waiting', tostring(n)} end
  local counts = {}
  for _, member_fp in pairs(group_members(h)) do
    counts[member_fp] = (counts[member_fp] or 0) + 1
  end
  sealed = seal_group(h, cjson.encode(counts))
end
if not cjson.decode(sealed)[fp] then return {'late', sealed} end
if claim_lease(KEYS[2], ARGV[6], ARGV[7]) then return {'owner', sealed} end
return {'busy', sealed}
"""
# Store the members' verdicts and release our lease, making room first as the verdict
# cache's store does. KEYS[1] lease, KEYS[2..n-1] the members' cache keys, KEYS[n] the
# cache evictions counter; ARGV[1] token, ARGV[2] cache TTL s, ARGV[3]
# cache_max_memory_ratio, ARGV[4..] verdict JSONs. Returns the entries deleted for room.
_STORE = MAKE_ROOM + LEASE_LUA + """
local evicted = make_room(tonumber(ARGV[3]), #KEYS - 2, KEYS[#KEYS])
for i = 2, #KEYS - 1 do redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[2]) end
release_lease(KEYS[1], ARGV[1])
return evicted
"""

class GroupCaller(Protocol):
    """What group judging needs of a judge client: one chat-completions call, no retries
    (``rewardq.workers.judge_client.JudgeClient.complete``)."""

    async def complete(self, model: str, body: dict[str, Any],
                       max_tokens: int) -> TimedReply: ...


class GroupTimeout(Exception):
    """A member's deadline passed before its group was complete or judged."""


class GroupNoAnswer(Exception):
    """A member whose rollout has no final answer (the producer sends it with an empty
    response, so that its group still completes): it takes no part in the calls."""


class GroupInvalid(Exception):
    """A member that cannot be judged in its group (arrived after the group was sealed,
    or the group's members differ in prompt or reference)."""


@dataclass(frozen=True)
class PairScore:
    """A member's pairwise standing in its group.

    Attributes:
        points: wins counted 1 and ties 1/2, over both orders of every pair it is in.
        score: ``points`` over the comparisons it took part in: its share of wins.
        agreement: the share of its pairs whose two orders named the same winner (a
            tie in both counts as agreeing).
    """

    points: float
    score: float
    agreement: float


@dataclass(frozen=True)
class _Joined:
    state: str
    verdict: JudgeVerdict | None = None
    arrived: int = 0
    sealed: dict[str, int] | None = None


def pairwise_scores(counts: Mapping[str, int],
                    winners: Mapping[tuple[str, str], Winner]) -> dict[str, PairScore]:
    """Each member's share of wins and agreement from the judged pairs; pure.

    Args:
        counts: member fingerprint -> how many members of the group share it (two
            rollouts with the same text are two members, never compared: a tie).
        winners: ``(first, second)`` -> the winner of the call that showed ``first`` as
            A and ``second`` as B, for both orders of every pair of distinct members.

    Raises:
        KeyError: an order of a pair missing from ``winners``.
    """
    total = sum(counts.values())
    others = max(total - 1, 1)
    out = {}
    for i, copies in counts.items():
        points = float(copies - 1)  # both orders against each copy of itself: two ties
        agreeing = float(copies - 1)
        for j, weight in counts.items():
            if j == i:
                continue
            as_first, as_second = winners[(i, j)], winners[(j, i)]
            points += weight * ({"A": 1.0, "tie": 0.5, "B": 0.0}[as_first]
                                + {"B": 1.0, "tie": 0.5, "A": 0.0}[as_second])
            first_pick = {"A": i, "B": j, "tie": None}[as_first]
            second_pick = {"A": j, "B": i, "tie": None}[as_second]
            agreeing += weight * (first_pick == second_pick)
        out[i] = PairScore(points, points / (2 * others), agreeing / others)
    return out


class GroupJudging:
    """Judges the chunks of a spec with ``group`` set, for one worker process.

    Args:
        client: makes one judge call (``JudgeClient``).
        redis: the worker's asyncio Redis client.
        policy: retry limits and backoff, per call.
        metrics: judge calls, retries, cache lookups.
        cache_ttl_s: how long members' verdicts stay cached (``Settings.cache_ttl_s``).
        lease_ms: how long a group's lease outlives a silent (e.g. killed) owner; its
            live owner renews it every third of this.
        poll_s: first interval between a waiting member's polls (it grows to
            ``max_poll_s``).
        max_poll_s: longest interval between polls.
        max_memory_ratio: the share of Redis' maxmemory above which joining a group and
            storing its verdicts first delete cache entries, as the verdict cache does
            (``Settings.cache_max_memory_ratio``).
    """

    def __init__(self, client: GroupCaller, redis: aioredis.Redis, policy: RetryPolicy,
                 metrics: WorkerMetrics | None = None, *, cache_ttl_s: int, lease_ms: int,
                 poll_s: float = 0.02, max_poll_s: float = 0.25,
                 max_memory_ratio: float = DEFAULT_MAX_MEMORY_RATIO) -> None:
        self._client = client
        self._redis = redis
        self._ratio = max_memory_ratio
        self._policy = policy
        self._metrics = metrics or WorkerMetrics()
        self._cache_ttl_s = cache_ttl_s
        self._poll_s = poll_s
        self._max_poll_s = max_poll_s
        self._join = redis.register_script(_JOIN)
        self._store = redis.register_script(_STORE)
        #: the leases of the groups this process judges, renewed while held
        self._leases = Leases(redis, lease_ms, "judge group lease")
        self._node = f"{socket.gethostname()}:{os.getpid()}"
        #: (fingerprint, item id) -> the task resolving that member in this process
        self._members: dict[tuple[str, str], asyncio.Task[Outcome]] = {}
        #: group key -> the task judging that group in this process (we hold its lease)
        self._judging: dict[str, asyncio.Task[tuple[dict[str, JudgeVerdict], int]]] = {}

    async def score(self, chunk: ScoreChunk) -> list[ScoreResult]:
        """One result per item of ``chunk`` (whose ``spec.group`` is set), in order.

        Raises:
            rewardq.broker.connections.OUTAGE_ERRORS: Redis went away or was full (any error
                ``rewardq.broker.connections.is_outage`` names; the task scores the chunk again
                once it is back; members already judged come from the cache).
        """
        group = chunk.spec.group
        if group is None:
            raise ValueError("GroupJudging scores chunks whose spec has a group")
        loop = asyncio.get_running_loop()
        left_s = max(0.0, chunk.deadline - time.time())
        deadline = loop.time() + left_s
        ttl_s = max(3600, int(2 * left_s) + 1)
        results = []
        for item in chunk.items:
            if item.uid is None:
                results.append(_ready(ScoreResult.failure(
                    item.id, ResultStatus.INVALID,
                    f"group judging ({group.mode}) needs the item's uid: the items sharing "
                    "a uid are judged together")))
                continue
            key = (judge_fingerprint(chunk.spec, item), item.id)
            task = self._members.get(key)
            first = task is None
            if task is None:
                task = loop.create_task(self._resolve(chunk.spec, group, item, key[0],
                                                      deadline, ttl_s))
                self._members[key] = task
                task.add_done_callback(_forget(self._members, key))
            results.append(self._result(item, task, deadline, first=first))
        return list(await asyncio.gather(*results))

    async def _result(self, item: ScoreItem, task: asyncio.Task[Outcome], deadline: float,
                      *, first: bool) -> ScoreResult:
        loop = asyncio.get_running_loop()
        started = loop.time()

        def ms() -> float:
            return (loop.time() - started) * 1000

        try:
            # Shielded: a group still being judged at the deadline goes on and caches.
            outcome = await asyncio.wait_for(asyncio.shield(task), timeout=max(
                0.0, deadline - started) + _RESULT_GRACE_S)
        except GroupInvalid as exc:
            return ScoreResult.failure(item.id, ResultStatus.INVALID, str(exc),
                                       latency_ms=ms())
        except GroupNoAnswer:
            return ScoreResult.failure(item.id, ResultStatus.NO_ANSWER, GROUP_NO_ANSWER,
                                       latency_ms=ms())
        except GroupTimeout as exc:
            log.warning("item %r timed out: %s", item.id, exc)
            return ScoreResult.failure(item.id, ResultStatus.TIMEOUT, str(exc),
                                       latency_ms=ms())
        except JudgeFailed as exc:
            status = ResultStatus.BUDGET_EXCEEDED if exc.error.kind is JudgeErrorKind.BUDGET \
                else ResultStatus.FAILED
            return ScoreResult.failure(item.id, status, f"group judging: {exc.error}",
                                       attempts=exc.attempts if first else 0,
                                       latency_ms=ms())
        except TimeoutError:
            log.warning("item %r timed out: its chunk's deadline passed before its group "
                        "was judged", item.id)
            return ScoreResult.failure(item.id, ResultStatus.TIMEOUT,
                                       "deadline passed before the item's group was judged",
                                       latency_ms=ms())
        except Exception as exc:
            if is_outage(exc):  # Redis away or full: the task scores the chunk again
                raise
            # A bug must cost one item, not its chunk.
            log.exception("group judging of item %r failed", item.id)
            return ScoreResult.failure(item.id, ResultStatus.FAILED,
                                       f"internal error: {type(exc).__name__}: {exc}",
                                       latency_ms=ms())
        if first and not outcome.cached:
            return ScoreResult.from_verdict(item.id, outcome.verdict, cached=False,
                                            attempts=outcome.attempts, latency_ms=ms())
        return ScoreResult.from_verdict(item.id, outcome.verdict, cached=True,
                                        latency_ms=ms())

    async def _resolve(self, spec: JudgeSpec, group: GroupSpec, item: ScoreItem,
                       fingerprint: str, deadline: float, ttl_s: int) -> Outcome:
        """Join the member's group and poll until its verdict is there (or judge it)."""
        assert item.uid is not None
        loop = asyncio.get_running_loop()
        key = judge_group_key(spec, item.uid)
        item_json = item.model_dump_json()
        interval = self._poll_s
        joined = None
        while True:
            token = f"{self._node}/{uuid.uuid4().hex}"  # says who holds a lease
            was_first = joined is None
            joined = await self._join_group(key, item, fingerprint, item_json, group.size,
                                            ttl_s, token)
            if was_first:
                hit = joined.state == "cached"
                self._metrics.cache_lookup(int(hit), int(not hit))
                if joined.state == "busy":
                    self._metrics.dedup_wait()
            if joined.state == "cached" and joined.verdict is not None:
                return Outcome(joined.verdict, 0, cached=True)
            if joined.state == "late":
                raise GroupInvalid(
                    f"group uid={item.uid!r} was already complete with "
                    f"{sum((joined.sealed or {}).values())} other members when this item "
                    f"arrived (more members than judge_group_size={group.size}?)")
            if joined.state == "owner":
                judging = loop.create_task(self._judge_group(
                    spec, group, key, item.uid, joined.sealed or {}, token, deadline))
                self._judging[key] = judging
                judging.add_done_callback(_forget(self._judging, key, judging))
                verdicts, attempts = await asyncio.shield(judging)
                if not item.response:
                    raise GroupNoAnswer
                return Outcome(verdicts[fingerprint], attempts, cached=False)
            if not item.response:  # a member, but nothing of it to judge: no wait
                raise GroupNoAnswer
            local = self._judging.get(key)
            if local is not None:  # this process holds the lease: wait for its calls
                verdicts, _ = await asyncio.shield(local)
                if fingerprint in verdicts:
                    return Outcome(verdicts[fingerprint], 0, cached=True)
                continue
            if loop.time() >= deadline:
                raise GroupTimeout(_timeout_message(item.uid, group, joined))
            await asyncio.sleep(min(interval, max(0.0, deadline - loop.time())))
            interval = min(interval * 1.5, self._max_poll_s)

    async def _join_group(self, key: str, item: ScoreItem, fingerprint: str, item_json: str,
                          size: int, ttl_s: int, token: str) -> _Joined:
        state, payload = await run_making_room(
            self._join, self._redis, [key, judge_group_lock_key(key), cache_key(fingerprint)],
            [item.id, fingerprint, item_json, size, ttl_s, token, self._leases.ttl_ms,
             self._node,
             self._ratio], f"cannot join group {key}")
        state, text = reply_text(state), reply_text(payload)
        if state == "cached":
            return _Joined(state, verdict=JudgeVerdict.model_validate_json(text))
        if state == "waiting":
            return _Joined(state, arrived=int(text))
        return _Joined(state, sealed={str(k): int(v) for k, v in json.loads(text).items()})

    async def _judge_group(self, spec: JudgeSpec, group: GroupSpec, key: str, uid: str,
                           sealed: dict[str, int], token: str, deadline: float
                           ) -> tuple[dict[str, JudgeVerdict], int]:
        """Make the group's calls under our lease and cache every member's verdict."""
        lease = judge_group_lock_key(key)
        self._leases.hold(lease, token)
        stored = False
        try:
            raw = await self._redis.hmget(key, [f"p:{fp}" for fp in sealed])
            items = {}
            for fp, value in zip(sealed, raw, strict=True):
                if value is None:
                    raise GroupInvalid(f"group uid={uid!r}: its members' items expired in "
                                       "Redis")
                item = ScoreItem.model_validate_json(value)
                if item.response:  # members without an answer take no part in the calls
                    items[fp] = item
            answered = {fp: n for fp, n in sealed.items() if fp in items}
            if group.mode == "pairwise" and sum(answered.values()) == 1:
                raise GroupInvalid(f"group uid={uid!r}: one member has an answer, the others "
                                   "none: there is nothing to compare it with")
            verdicts, attempts = await self._verdicts(spec, group, key, uid, items, answered,
                                                      deadline) if items else ({}, 0)
            fps = list(verdicts)
            # Without the fields at their defaults, as the verdict cache stores them.
            await run_making_room(
                self._store, self._redis, [lease, *(cache_key(fp) for fp in fps)],
                [token, self._cache_ttl_s, self._ratio,
                 *(verdicts[fp].model_dump_json(exclude_defaults=True) for fp in fps)],
                f"cannot cache the {len(fps)} verdict(s) of group uid={uid!r}")
            stored = True
            return verdicts, attempts
        except JudgeFailed as exc:
            log.warning("group uid=%r failed for good after %d attempt(s): %s", uid,
                        exc.attempts, exc.error)
            raise
        finally:
            self._leases.forget(lease, token)  # the store gave it back, or:
            if not stored:
                with contextlib.suppress(Exception):  # else the lease lapses on its own
                    await asyncio.shield(self._leases.release(lease, token))

    async def _verdicts(self, spec: JudgeSpec, group: GroupSpec, key: str, uid: str,
                        items: dict[str, ScoreItem], counts: dict[str, int], deadline: float
                        ) -> tuple[dict[str, JudgeVerdict], int]:
        order = presentation_order(key, items)
        prompt, reference = items[order[0]].prompt, items[order[0]].reference
        if any(items[fp].prompt != prompt or items[fp].reference != reference
               for fp in order):
            raise GroupInvalid(f"the members of group uid={uid!r} differ in prompt or "
                               "reference; a group is the rollouts of one prompt")
        if group.mode == "listwise":
            names = labels(len(order))
            body = listwise_request(spec, prompt, reference,
                                    [items[fp].response for fp in order])
            scores, usage, attempts = await self._call(
                spec, body, listwise_max_tokens(spec, len(order)),
                lambda content: parse_listwise(content, names), deadline)
            shares = _split(usage, len(order))
            return {fp: JudgeVerdict(score=normalize(scores[name]), raw_score=scores[name],
                                     usage=share)
                    for fp, name, share in zip(order, names, shares, strict=True)}, attempts
        ordered = [(a, b) for a in order for b in order if a != b]
        calls = [asyncio.ensure_future(self._call(
            spec, pairwise_request(spec, prompt, reference, items[a].response,
                                   items[b].response),
            reply_budget(spec), parse_pairwise, deadline)) for a, b in ordered]
        try:
            replies = await asyncio.gather(*calls)
        finally:
            for call in calls:  # one pair failed for good: the group has failed
                call.cancel()
        winners = {pair: reply[0] for pair, reply in zip(ordered, replies, strict=True)}
        standings = pairwise_scores(counts, winners)
        total = Usage(prompt_tokens=sum(r[1].prompt_tokens for r in replies),
                      completion_tokens=sum(r[1].completion_tokens for r in replies),
                      reasoning_tokens=sum(r[1].reasoning_tokens for r in replies))
        shares = _split(total, len(order))
        return {fp: JudgeVerdict(score=standings[fp].score, raw_score=standings[fp].points,
                                 usage=share, agreement=standings[fp].agreement)
                for fp, share in zip(order, shares, strict=True)}, sum(r[2] for r in replies)

    async def _call(self, spec: JudgeSpec, body: dict[str, Any], max_tokens: int,
                    parse: Callable[[str | None], T], deadline: float
                    ) -> tuple[T, Usage, int]:
        """One group call with retries: what ``parse`` read, the usage, the attempts."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            if loop.time() >= deadline:
                raise TimeoutError  # no call nobody awaits
            attempt += 1
            try:
                reply = await self._client.complete(spec.model, body, max_tokens)
                try:
                    parsed = parse(reply.content)
                except UnparseableReplyError as exc:
                    self._metrics.judge_call(spec.model, call_status(exc), reply.latency_s)
                    raise
                self._metrics.judge_call(spec.model, "ok", reply.latency_s)
                return parsed, reply.usage, attempt
            except JudgeError as exc:
                decision = decide(self._policy, exc, attempt, deadline - loop.time())
                if not decision.retry:
                    raise JudgeFailed(exc, attempt) from exc
                self._metrics.retry(call_status(exc))
            await asyncio.sleep(decision.delay_s)


def _timeout_message(uid: str, group: GroupSpec, joined: _Joined | None) -> str:
    if joined is not None and joined.state == "waiting":
        return (f"deadline passed with {joined.arrived} of {group.size} members of group "
                f"uid={uid!r} arrived ({group.mode} group judging waits for the whole "
                "group: members lost or filtered out, or judge_group_size set wrong?)")
    return (f"deadline passed while another worker was judging group uid={uid!r} "
            f"({group.mode})")


def _split(usage: Usage, n: int) -> list[Usage]:
    """``usage`` shared out over ``n`` members, so the members' usages add up to it."""
    def share(total: int, k: int) -> int:
        return total // n + (1 if k < total % n else 0)
    return [Usage(prompt_tokens=share(usage.prompt_tokens, k),
                  completion_tokens=share(usage.completion_tokens, k),
                  reasoning_tokens=share(usage.reasoning_tokens, k)) for k in range(n)]



async def _ready(result: ScoreResult) -> ScoreResult:
    return result


def _forget(tasks: dict[Any, Any], key: Any,
            task: asyncio.Task[Any] | None = None) -> Callable[[asyncio.Task[Any]], None]:
    def forget(done: asyncio.Task[Any]) -> None:
        if tasks.get(key) is (task or done):
            del tasks[key]
    return forget
