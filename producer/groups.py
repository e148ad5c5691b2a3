"""``GroupMedians``: the median length of a GRPO group whose samples arrive one by one.

verl's reward loop scores each sample alone, on one of several processes, as its
rollout finishes. The group-median length penalty needs the lengths of all the
samples that share a ``uid``, so every process records its samples in Redis and waits,
without blocking its event loop, until the group is complete:

- a sample joins its group under a *member id* (a hash of its prompt and response
  tokens), so the copies of the first rows that verl pads a batch with count once;
- the group is complete when it has ``expected`` distinct members; the first process to
  see that *seals* it (the median, the member count, the status), atomically, and every
  other member, late ones included, reads the seal: all members use one median (a group
  rendezvous, ``rewardq.broker.rendezvous``);
- two rollouts of one prompt can also be token for token the same (a short answer): when
  the arrivals, repeats included, reach ``expected`` but the distinct members do not,
  the repeats count as genuine identical samples once ``settle_s`` has passed with no
  new member (padding copies arrive with their batch, so the wait tells them apart from
  a sibling still generating) — ``complete``;
- when it is not complete after ``wait_s`` (a rollout lost or filtered out, a group size
  configured wrong), the waiter seals it with what is there: the median of the distinct
  members seen, with status ``incomplete``. Never a hang, never a silent wrong median:
  the status says which.

Key: ``rewardq:group:<uid>`` (HASH; see :mod:`rewardq.broker.keys`), TTL ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis

from rewardq.broker.errors import BrokerUnavailableError
from rewardq.broker.keys import group_key
from rewardq.broker.rendezvous import RENDEZVOUS_LUA, read_group

__all__ = ["GroupMedian", "GroupMedians", "GroupStatus", "member_id"]

_FIRST_POLL_S = 0.01
_MAX_POLL_S = 0.2

# A group rendezvous (rewardq.broker.rendezvous): members join with their length.
# KEYS[1] group hash. ARGV: member id, length, ttl seconds.
# The rendezvous' fields (m:<member> -> length, n, sealed -> JSON seal), and
# c:<member> -> arrivals. Returns the hash (HGETALL).
_JOIN = RENDEZVOUS_LUA + """
local key, member = KEYS[1], ARGV[1]
join_group(key, member, ARGV[2], ARGV[3])
redis.call('HINCRBY', key, 'c:' .. member, 1)
return redis.call('HGETALL', key)
"""

# KEYS[1] group hash. ARGV: seal JSON. Returns the seal that holds (first one wins).
_SEAL = RENDEZVOUS_LUA + """
return seal_group(KEYS[1], ARGV[1])
"""


class GroupStatus(enum.StrEnum):
    """How a sample's group median was decided."""

    COMPLETE = "complete"      #: all ``expected`` members were seen
    INCOMPLETE = "incomplete"  #: sealed after the wait with fewer members
    SINGLE = "single"          #: no uid, or a group size of 1: the sample alone


@dataclass(frozen=True)
class GroupMedian:
    """The decided median of one group, the same for every member."""

    median: float
    size: int
    status: GroupStatus


def member_id(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str:
    """A sample's identity in its group: identical copies (verl's padding) share it."""
    blob = json.dumps([list(prompt_ids), list(response_ids)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


RunBlocking = Callable[..., Awaitable[Any]]


class GroupMedians:
    """Coordinates group medians across processes through Redis.

    Args:
        redis_client: a synchronous redis-py client (calls run through ``run_blocking``).
        run_blocking: ``await run_blocking(fn, *args)`` runs a blocking call off the
            event loop (e.g. ``AsyncRewardClient.run_blocking``).
        wait_s: how long a member waits for its group before sealing it as it is.
        settle_s: how long repeats wait for a distinct member before they count as
            genuine identical samples.
        ttl_s: lifetime of a group's key after its last arrival.
    """

    def __init__(self, redis_client: redis.Redis, run_blocking: RunBlocking, *,
                 wait_s: float, settle_s: float = 2.0, ttl_s: int = 3600) -> None:
        self._redis = redis_client
        self._run = run_blocking
        self.wait_s = wait_s
        self.settle_s = min(settle_s, wait_s)
        self.ttl_s = max(ttl_s, int(wait_s * 2) + 1)
        self._join = redis_client.register_script(_JOIN)
        self._seal = redis_client.register_script(_SEAL)

    async def median(self, uid: str | None, member: str, length: int, expected: int
                     ) -> GroupMedian:
        """Record a sample and return its group's median once the group is decided.

        Args:
            uid: the GRPO group id; ``None`` means the sample is alone.
            member: the sample's :func:`member_id`.
            length: its response length in tokens.
            expected: how many distinct samples the group has.

        Raises:
            BrokerUnavailableError: Redis could not be reached.
        """
        if uid is None or expected <= 1:
            return GroupMedian(float(length), 1, GroupStatus.SINGLE)
        key = group_key(uid)
        deadline = time.monotonic() + self.wait_s
        state = await self._redis_call(
            lambda: self._join(keys=[key], args=[member, length, self.ttl_s]))
        interval = _FIRST_POLL_S
        settled_at: float | None = None  # when the arrivals first reached ``expected``
        while True:
            now = time.monotonic()
            if settled_at is None and _arrivals(state) >= expected:
                settled_at = now + self.settle_s
            seal = _decided(state, expected, repeats_ok=settled_at is not None
                            and now >= settled_at, final=now >= deadline)
            if seal is not None:
                return _parse_seal(await self._redis_call(partial(
                    self._seal, keys=[key], args=[seal])))
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 1.5, _MAX_POLL_S)
            state = await self._redis_call(lambda: self._redis.hgetall(key))

    async def _redis_call(self, call: Callable[[], Any]) -> Any:
        try:
            return await self._run(call)
        except redis.RedisError as exc:
            raise BrokerUnavailableError(f"cannot coordinate the GRPO group: {exc}") from exc


def _arrivals(state: Any) -> int:
    return sum(int(v) for k, v in read_group(state).fields.items() if k.startswith("c:"))


def _decided(state: Any, expected: int, *, repeats_ok: bool, final: bool) -> str | None:
    """The seal to write now, or ``None`` to keep waiting."""
    group = read_group(state)
    if group.sealed is not None:
        return group.sealed
    lengths = {member: int(value) for member, value in group.members.items()}
    counts = {k[2:]: int(v) for k, v in group.fields.items() if k.startswith("c:")}
    if len(lengths) >= expected:
        return _seal_json(list(lengths.values()), GroupStatus.COMPLETE)
    arrivals = [lengths[m] for m, n in counts.items() if m in lengths for _ in range(n)]
    if len(arrivals) >= expected and (repeats_ok or final):
        # Repeats beyond the distinct members are taken as genuine identical samples.
        extra = sorted(arrivals)
        for value in lengths.values():
            extra.remove(value)
        return _seal_json([*lengths.values(), *extra[:expected - len(lengths)]],
                          GroupStatus.COMPLETE)
    if not final:
        return None
    return _seal_json(list(lengths.values()), GroupStatus.INCOMPLETE)


def _seal_json(lengths: list[int], status: GroupStatus) -> str:
    # numpy's median: the mean of the two middle values of an even-sized group.
    return json.dumps({"median": statistics.median(lengths), "size": len(lengths),
                       "status": status.value})


def _parse_seal(raw: Any) -> GroupMedian:
    seal = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    return GroupMedian(float(seal["median"]), int(seal["size"]), GroupStatus(seal["status"]))

