"""The judge cache and the in-flight locks, in Redis (keys in ``rewardq.broker.keys``).

A verdict is cached under the fingerprint of everything that changes the judge's
answer. While one worker judges a fingerprint it holds ``rewardq:inflight:<fp>``; any
other worker wanting the same fingerprint waits for the cached verdict instead of
calling the judge again. Claiming a whole chunk's fingerprints is one Lua call, and
storing verdicts with releasing their locks is another, shared by every verdict of the
process that finishes close to it (group commit: the verdicts finished in one loop tick,
or while the previous batch was on its way to Redis, go in one call). Each ``store``
still returns only once its own verdict is in Redis.

Locks are token-owned leases (``rewardq.workers.leases``): the claim and store scripts take
and give them back with the writes they guard, and the owning process renews all the
locks it holds in one Lua call every third of their TTL, however long a call waits for a
concurrency slot or backs off between retries. A process that dies (SIGKILL) stops
renewing, so its locks lapse within one TTL and a waiter takes the work over.

The cache is a cache: it gives way so that nothing else has to. Redis runs with
``noeviction`` (queued chunks, results, leases and heartbeats must never be dropped), so
the claim and store calls make room themselves: while Redis' used memory is above
``Settings.cache_max_memory_ratio`` of its ``maxmemory``, each call first deletes cache
entries, the least recently used of a few sampled at random each time (the sampling
Redis' own LRU eviction does), two per entry it writes and more the further memory is
over (``rewardq:stats:cache_evictions`` counts them). Because the deletes come first, a
store still lands when Redis is full of verdicts (a script that has written may go on
writing). Verdicts are stored without their default fields (a score, a raw score and
the tokens): about 60 bytes of JSON each. Group judging (``rewardq.workers.group_judging``)
makes room the same way before it writes a group's state or its members' verdicts
(:data:`MAKE_ROOM`, :func:`run_making_room`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from rewardq.broker.connections import is_redis_full, redis_full_error
from rewardq.broker.keys import CACHE_EVICTIONS, cache_key, inflight_key
from rewardq.broker.schemas import JudgeVerdict
from rewardq.broker.settings import Settings
from rewardq.workers.leases import LEASE_LUA, Leases

log = logging.getLogger(__name__)

#: The most cache entries one claim or store call deletes to make room (bounds how long
#: one script holds Redis: each is a few RANDOMKEY and one OBJECT IDLETIME).
EVICT_MAX_PER_CALL = 512
#: Cache entries sampled per deletion; the least recently used of them goes.
EVICT_SAMPLES = 5
#: ``Settings.cache_max_memory_ratio``'s default, for components built without settings.
DEFAULT_MAX_MEMORY_RATIO: float = Settings.model_fields["cache_max_memory_ratio"].default
#: What one entry takes in Redis, roughly (key, value, expiry): how many to delete for
#: the bytes over the line.
ENTRY_BYTES = 200

# Prologue of every script that writes cache entries or what a chunk needs next to them
# (the claim and store scripts here, group judging's join and store): make room by
# deleting cache entries. Run such a script with :func:`run_making_room`.
# make_room(ratio, writes, counter): while used_memory > ratio * maxmemory (a maxmemory
# of 0 = no cap: nothing to do), delete the least recently used (OBJECT IDLETIME) of
# EVICT_SAMPLES cache keys drawn by RANDOMKEY, 2 per entry about to be written plus one
# per ENTRY_BYTES over the line, at most EVICT_MAX_PER_CALL; INCRBY counter by the number
# deleted. Deleting first also lets the writes after it run while Redis is full.
MAKE_ROOM = f"""
local function make_room(ratio, writes, counter)
  local info = redis.call('INFO', 'memory')
  local used = tonumber(string.match(info, 'used_memory:(%d+)'))
  local cap = tonumber(string.match(info, 'maxmemory:(%d+)')) or 0
  if cap == 0 or used == nil or used <= cap * ratio then return 0 end
  local want = math.min({EVICT_MAX_PER_CALL},
                        2 * writes + math.ceil((used - cap * ratio) / {ENTRY_BYTES}))
  local prefix = '{cache_key("")}'
  local evicted = 0
  for _ = 1, want do
    local best, idle, seen = nil, -1, 0
    for _ = 1, {4 * EVICT_SAMPLES} do
      local key = redis.call('RANDOMKEY')
      if not key then break end
      if string.sub(key, 1, #prefix) == prefix then
        local age = redis.call('OBJECT', 'IDLETIME', key)
        if age and age > idle then best, idle = key, age end
        seen = seen + 1
        if seen == {EVICT_SAMPLES} then break end
      end
    end
    if not best then break end
    redis.call('DEL', best)
    evicted = evicted + 1
  end
  if evicted > 0 then redis.call('INCRBY', counter, evicted) end
  return evicted
end
"""

# Claim a batch of fingerprints.
# KEYS: 2n keys, pairs (rewardq:cache:<fp> STRING verdict JSON,
#                       rewardq:inflight:<fp> STRING owner token, TTL ARGV[2] ms),
#       then rewardq:stats:cache_evictions.
# ARGV[1] = owner token, ARGV[2] = lock TTL in ms, ARGV[3] = cache_max_memory_ratio.
# Returns, per pair, the cached verdict JSON, or 1 (now ours), or 0 (another owner), then
# the number of cache entries deleted to make room.
_CLAIM = MAKE_ROOM + LEASE_LUA + """
local n = (#KEYS - 1) / 2
local evicted = make_room(tonumber(ARGV[3]), n, KEYS[#KEYS])
local out = {}
for i = 1, #KEYS - 1, 2 do
  local v = redis.call('GET', KEYS[i])
  if v then
    out[#out + 1] = v
  elseif claim_lease(KEYS[i + 1], ARGV[1], ARGV[2]) then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
out[#out + 1] = evicted
return out
"""
# Store verdicts and release our locks.
# KEYS: 2n keys, pairs (rewardq:cache:<fp> STRING verdict JSON, TTL ARGV[1] s,
#                       rewardq:inflight:<fp> STRING owner token),
#       then rewardq:stats:cache_evictions.
# ARGV[1] = cache TTL s, ARGV[2] = cache_max_memory_ratio; ARGV[2i + 1], ARGV[2i + 2] =
# verdict JSON and owner token of pair i. A lock is deleted only while it still holds the
# token (a lapsed lock re-taken by another owner is left alone). Returns the number of
# cache entries deleted to make room.
_STORE_MANY = MAKE_ROOM + LEASE_LUA + """
local evicted = make_room(tonumber(ARGV[2]), (#KEYS - 1) / 2, KEYS[#KEYS])
for i = 1, #KEYS - 1, 2 do
  redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[1])
  release_lease(KEYS[i + 1], ARGV[i + 3])
end
return evicted
"""
#: The most verdicts one store call carries (bounds how long one script holds Redis).
STORE_BATCH_MAX = 256
#: How long ``close`` waits for a store call under way.
CLOSE_WAIT_S = 5.0


def _resolve(entries: Iterable[tuple[Any, ...]], result: Any,
             error: BaseException | None = None) -> None:
    """Answer the future that ends each of ``entries``, unless its caller was cancelled:
    with ``error`` (a ``CancelledError`` cancels it), else with ``result``."""
    for *_, future in entries:
        if future.done():
            continue
        if error is None:
            future.set_result(result)
        elif isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)


async def run_making_room(script: AsyncScript, client: aioredis.Redis, keys: list[str],
                          args: Sequence[str | int | float], what: str) -> Any:
    """Run ``script``, a script that starts with :data:`MAKE_ROOM`, on ``keys`` and
    ``args``: the cache evictions counter (``rewardq:stats:cache_evictions``) goes last in
    its KEYS, appended here. Returns what the script returns.

    Raises:
        RedisFullError: Redis refused the script's writes for memory (``what`` it was
            doing; nothing more could be made room for: the rest is not cache), logged
            with Redis' memory figures. An outage, for ``rewardq.broker.connections.is_outage``.
        redis.RedisError: any other Redis error, as it came.
    """
    try:
        return await script(keys=[*keys, CACHE_EVICTIONS], args=list(args))
    except redis.ResponseError as exc:
        if not is_redis_full(exc):
            raise
        memory: tuple[int | None, int | None] | None = None
        try:
            info = await client.info("memory")
            memory = (int(info["used_memory"]), int(info.get("maxmemory", 0)))
        except Exception:  # the figures are a courtesy; the error is what matters
            log.debug("could not read Redis' memory figures", exc_info=True)
        error = redis_full_error(what, exc, memory=memory)
        log.warning("%s", error)
        raise error from exc


class ClaimState(enum.Enum):
    """What a claim found for one fingerprint."""

    CACHED = "cached"  #: a verdict is cached: no judge call needed
    OWNED = "owned"  #: the lock is ours: we call the judge
    BUSY = "busy"  #: another caller holds the lock: wait for its verdict


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming one fingerprint (``verdict`` set when ``CACHED``)."""

    state: ClaimState
    verdict: JudgeVerdict | None = None


class JudgeCache:
    """Cached verdicts and in-flight locks for one worker process.

    Args:
        redis: an asyncio Redis client on the worker's loop.
        ttl_s: how long a verdict stays cached.
        lock_ttl_ms: how long an in-flight lock outlives a silent (e.g. killed) owner;
            live owners renew theirs every third of it.
        poll_s: how often a waiter looks for the owner's verdict.
        max_memory_ratio: the share of Redis' maxmemory above which the cache gives way
            (``Settings.cache_max_memory_ratio``).
    """

    def __init__(self, redis: aioredis.Redis, ttl_s: int, lock_ttl_ms: int,
                 poll_s: float = 0.02,
                 max_memory_ratio: float = DEFAULT_MAX_MEMORY_RATIO) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._ratio = max_memory_ratio
        self._poll_s = poll_s
        self._claim = redis.register_script(_CLAIM)
        self._store_many = redis.register_script(_STORE_MANY)
        #: the in-flight locks this process holds, renewed while held
        self._locks = Leases(redis, lock_ttl_ms, "in-flight lock")
        #: verdicts waiting for the next store call: (fingerprint, JSON, token, stored)
        self._to_store: list[tuple[str, str, str, asyncio.Future[None]]] = []
        self._storer: asyncio.Task[None] | None = None
        #: fingerprint -> (deadline, future) of each caller waiting for another's verdict
        self._waiting: dict[str, list[tuple[float, asyncio.Future[JudgeVerdict | None]]]] = {}
        self._watcher: asyncio.Task[None] | None = None
        #: store calls made, and verdicts they carried (for tests and benchmarks)
        self.store_calls = 0
        self.stored_verdicts = 0
        #: rounds the owner watcher made (one round trip each, however many waiters)
        self.watch_rounds = 0
        #: cache entries this process deleted to make room
        self.evicted = 0

    @property
    def held_locks(self) -> int:
        """How many in-flight locks this process holds (and renews) right now."""
        return self._locks.held

    async def claim(self, fingerprints: list[str], token: str) -> list[Claim]:
        """For each fingerprint: its cached verdict, or its lock (``token``), or busy.

        Locks won here are renewed in the background until ``store`` or ``release_lock``.
        """
        if not fingerprints:
            return []
        keys = [k for fp in fingerprints for k in (cache_key(fp), inflight_key(fp))]
        raw = await run_making_room(self._claim, self._redis, keys,
                                    [token, self._locks.ttl_ms, self._ratio],
                                    f"cannot claim {len(fingerprints)} verdict(s)")
        self.evicted += int(raw.pop())
        claims = [Claim(ClaimState.CACHED, JudgeVerdict.model_validate_json(v))
                  if isinstance(v, bytes | str)
                  else Claim(ClaimState.OWNED if v == 1 else ClaimState.BUSY) for v in raw]
        for fp, claim in zip(fingerprints, claims, strict=True):
            if claim.state is ClaimState.OWNED:
                self._locks.hold(inflight_key(fp), token)
        return claims

    async def store(self, fingerprint: str, verdict: JudgeVerdict, token: str) -> None:
        """Cache ``verdict`` with the configured TTL and release our lock, atomically.

        Returns once the verdict is in Redis. Verdicts stored close together in this
        process share one Lua call: the first starts a batch for the next loop tick, and
        those that arrive while a batch is on its way go in the next one.

        Raises:
            rewardq.broker.connections.OUTAGE_ERRORS: Redis could not store the batch (the lock
                stays ours, and renewed, until ``release_lock``).
        """
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        # Without the fields at their defaults (JudgeVerdict and the producer's
        # ScoreResult.from_cached_verdicts read them back as such).
        self._to_store.append((fingerprint, verdict.model_dump_json(exclude_defaults=True),
                               token, stored))
        if self._storer is None:
            self._storer = loop.create_task(self._store_queued())
        # A caller cancelled here cancels only its own future: its verdict is still
        # stored with the batch, and others waiting on that batch are not disturbed.
        await stored
        self._locks.forget(inflight_key(fingerprint), token)

    async def _store_queued(self) -> None:
        """Store the queued verdicts, a batch per call, until none is left."""
        batch: list[tuple[str, str, str, asyncio.Future[None]]] = []
        try:
            while self._to_store:
                batch = self._to_store[:STORE_BATCH_MAX]
                del self._to_store[:STORE_BATCH_MAX]
                keys = [k for fp, _, _, _ in batch for k in (cache_key(fp), inflight_key(fp))]
                args: list[str | int | float] = [self._ttl_s, self._ratio]
                for _, value, token, _ in batch:
                    args += (value, token)
                self.store_calls += 1
                self.stored_verdicts += len(batch)
                try:
                    evicted = await run_making_room(self._store_many, self._redis, keys, args,
                                                    f"cannot cache {len(batch)} verdict(s)")
                    self.evicted += int(evicted)
                except Exception as exc:  # each waiter gets the error its own call would
                    _resolve(batch, None, exc)
                else:
                    _resolve(batch, None)
                batch = []
        except BaseException as exc:  # cancelled (close): nobody may wait forever
            _resolve(batch + self._to_store, None, exc)
            self._to_store = []
            raise
        finally:
            self._storer = None

    async def release_lock(self, fingerprint: str, token: str) -> None:
        """Release our lock without a verdict; a lock re-taken by another is left alone."""
        await self._locks.release(inflight_key(fingerprint), token)

    async def renew_locks(self) -> int:
        """Push the expiry of every lock we hold out by a full TTL; returns how many."""
        return await self._locks.renew()

    async def close(self) -> None:
        """Finish storing the verdicts queued (for up to ``CLOSE_WAIT_S``), then stop
        renewing locks (they lapse within one TTL)."""
        storer = self._storer
        if storer is not None:
            await asyncio.wait({storer}, timeout=CLOSE_WAIT_S)
            if not storer.done():
                storer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await storer
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
            for waiters in self._waiting.values():
                _resolve(waiters, None)
            self._waiting.clear()
        await self._locks.close()

    async def wait_for_owner(self, fingerprint: str, deadline: float) -> JudgeVerdict | None:
        """Wait while another caller judges ``fingerprint``.

        Every fingerprint this process waits on is looked at by one watcher, every
        ``poll_s``, in one round trip (an MGET of the verdicts and one of the locks), not
        by a poll per waiter: a step with hundreds of duplicates in flight on other
        processes made two Redis commands per waiter per ``poll_s``.

        Returns:
            The owner's verdict, or ``None`` once the lock is gone without one (the owner
            failed or died) or ``deadline`` (loop time) passed: the caller decides then.

        Raises:
            rewardq.broker.connections.OUTAGE_ERRORS: Redis could not be asked.
        """
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            return None
        found: asyncio.Future[JudgeVerdict | None] = loop.create_future()
        self._waiting.setdefault(fingerprint, []).append((deadline, found))
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch_owners())
        return await found

    async def _watch_owners(self) -> None:
        """Answer the waiters of ``wait_for_owner``, one round trip per round."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            await asyncio.sleep(self._poll_s)
            fingerprints = list(self._waiting)
            self.watch_rounds += 1
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.mget([cache_key(fp) for fp in fingerprints])
                    pipe.mget([inflight_key(fp) for fp in fingerprints])
                    values, locks = await pipe.execute()
            except Exception as exc:  # every waiter of this round sees the outage
                for fp in fingerprints:
                    _resolve(self._waiting.pop(fp, []), None, exc)
                continue
            now = loop.time()
            for fp, value, lock in zip(fingerprints, values, locks, strict=True):
                if value is not None:
                    try:
                        verdict = JudgeVerdict.model_validate_json(value)
                    except ValueError as exc:
                        _resolve(self._waiting.pop(fp, []), None, exc)
                    else:
                        _resolve(self._waiting.pop(fp, []), verdict)
                elif lock is None:  # the owner is gone without a verdict
                    _resolve(self._waiting.pop(fp, []), None)
                else:
                    late = [w for w in self._waiting[fp] if now >= w[0]]
                    _resolve(late, None)
                    left = [w for w in self._waiting[fp] if now < w[0] and not w[1].done()]
                    if left:
                        self._waiting[fp] = left
                    else:
                        del self._waiting[fp]
