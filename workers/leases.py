"""Leases: what a live worker process holds, and a dead one loses within one lease.

Two kinds, one contract: while it lives, the holder renews its leases
:data:`RENEWALS_PER_TTL` times per lease length; a process that dies (SIGKILL) stops
renewing, so what it held lapses within one lease and another process takes the work over.

**Token-owned leases** (:data:`LEASE_LUA`, :class:`Leases`): a Redis STRING holding its
owner's token, with a TTL. The verdict cache's in-flight locks (``rewardq.workers.cache``)
and group judging's group leases (``rewardq.workers.group_judging``) are such leases. A
script takes one with ``claim_lease`` as part of what it does atomically (claiming a
chunk's fingerprints, completing a group) and gives it back with ``release_lease`` as
part of storing the verdicts it guarded; both are Lua functions of :data:`LEASE_LUA`,
which such scripts start with. Renewing and releasing go by token: a lease that lapsed
and was taken by another owner is neither extended nor deleted. :class:`Leases` keeps the
leases a process holds and renews them all in one Lua call.

**Chunk leases** (:class:`ChunkLeases`): the Redis transport hands an unacked message out
again once its delivery time in ``unacked_index`` (``rewardq.broker.keys``) is older than
the visibility timeout, which ``rewardq.broker.app`` sets to ``Settings.chunk_lease_s``.
Kombu owns those keys; every third of a lease, :class:`ChunkLeases`

- bumps that time for every message this worker has reserved or is running
  (``ZADD XX``: a message acked meanwhile is not re-added), so a slow chunk is never
  handed out twice;
- runs kombu's own restore of lapsed messages. Kombu only does that on an idle poll of
  its synchronous loop, which the gevent pool never reaches while a BRPOP is pending
  (a SIGKILLed worker's chunks would stay unacked for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import gevent
import redis.asyncio as aioredis
from celery import Celery
from celery.worker import state as worker_state

from rewardq.broker.connections import redis_client
from rewardq.broker.keys import chunk_lease_key
from rewardq.broker.settings import Settings
from rewardq.workers.hooks import WorkerHook

__all__ = ["LEASE_LUA", "RENEWALS_PER_TTL", "ChunkLeases", "Leases"]

log = logging.getLogger(__name__)

#: A holder renews its leases this many times per lease length: a renewal may fail (Redis
#: away for a moment) and the next one still comes before the lease lapses.
RENEWALS_PER_TTL = 3

# The token-owned lease, as Lua functions for the scripts that take or give back a lease
# together with other writes (start such a script with LEASE_LUA). A lease is a STRING
# key holding its owner's token, with a TTL in ms.
# claim_lease(key, token, ms): take the lease if nobody holds it (SET NX PX); truthy when
#   it is now ours.
# renew_lease(key, token, ms): extend it by ms if it still holds token; 1 if it did, else 0.
# release_lease(key, token): delete it if it still holds token; 1 if it did, else 0.
LEASE_LUA = """
local function claim_lease(key, token, ms)
  return redis.call('SET', key, token, 'NX', 'PX', ms)
end
local function renew_lease(key, token, ms)
  if redis.call('GET', key) == token then return redis.call('PEXPIRE', key, ms) end
  return 0
end
local function release_lease(key, token)
  if redis.call('GET', key) == token then return redis.call('DEL', key) end
  return 0
end
"""
# Renew leases. KEYS = n lease keys; ARGV[1] = lease ms, ARGV[1 + i] = our token for
# KEYS[i]. Returns, per key, 1 (extended) or 0 (no longer ours).
_RENEW = LEASE_LUA + """
local out = {}
for i = 1, #KEYS do out[i] = renew_lease(KEYS[i], ARGV[i + 1], ARGV[1]) end
return out
"""
# KEYS[1] = lease key; ARGV[1] = token: delete it if it is still ours.
_RELEASE = LEASE_LUA + """
return release_lease(KEYS[1], ARGV[1])
"""


class _Held:
    """One lease held: its token. A lease held again after it was lost is a new ``_Held``,
    so a renewal that answered for the old one cannot drop the new one."""

    __slots__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token


class Leases:
    """The token-owned leases one process holds on one event loop, renewed together.

    A lease taken by a script (``claim_lease``) is handed to :meth:`hold`; from then on it
    is renewed by a full lease length every third of one, in one Lua call for every lease
    held, however long its holder waits (for a concurrency slot, between retries), until
    :meth:`forget` (a script gave it back with ``release_lease``) or :meth:`release`. A
    lease found no longer ours when renewing (it lapsed, Redis being away for a whole
    lease, and another owner may hold it now) is logged and no longer renewed.

    Args:
        redis: an asyncio Redis client on the holder's loop.
        ttl_ms: how long a lease outlives a silent (e.g. killed) holder.
        what: what the leases guard, for the logs (e.g. ``"in-flight lock"``).
    """

    def __init__(self, redis: aioredis.Redis, ttl_ms: int, what: str = "lease") -> None:
        self.ttl_ms = ttl_ms
        self._what = what
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        #: lease key -> our hold on it, for every lease held right now
        self._held: dict[str, _Held] = {}
        self._renewer: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        """How many leases this process holds (and renews) right now."""
        return len(self._held)

    def hold(self, key: str, token: str) -> None:
        """Renew the lease at ``key``, just taken with ``token``, until it is given back."""
        self._held[key] = _Held(token)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_while_held())

    def forget(self, key: str, token: str) -> None:
        """Stop renewing the lease at ``key`` (a script gave it back); another token's
        hold on the same key is left alone."""
        held = self._held.get(key)
        if held is not None and held.token == token:
            del self._held[key]

    async def release(self, key: str, token: str) -> None:
        """Stop renewing the lease at ``key`` and delete it while it still holds
        ``token`` (a lease re-taken by another owner is left alone).

        Raises:
            redis.RedisError: Redis could not be asked (the lease lapses on its own).
        """
        self.forget(key, token)
        await self._release(keys=[key], args=[token])

    async def renew(self) -> int:
        """Push the expiry of every lease held out by a full lease; returns how many were.

        Raises:
            redis.RedisError: Redis could not be asked (nothing is forgotten).
        """
        held = list(self._held.items())
        if not held:
            return 0
        renewed = await self._renew(keys=[key for key, _ in held],
                                    args=[self.ttl_ms, *(h.token for _, h in held)])
        for (key, hold), ok in zip(held, renewed, strict=True):
            if not int(ok) and self._held.get(key) is hold:
                del self._held[key]
                log.warning("lost the %s %s: it lapsed unrenewed and another worker may "
                            "hold it now (and do the same work)", self._what, key)
        return sum(int(ok) for ok in renewed)

    async def close(self) -> None:
        """Stop renewing (the leases still held lapse within one lease)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    async def _renew_while_held(self) -> None:
        period = self.ttl_ms / 1000 / RENEWALS_PER_TTL
        while self._held:
            await asyncio.sleep(period)
            try:
                await self.renew()
            except Exception:  # Redis away for a moment: the next round tries again
                log.warning("could not renew %d %s(s)", len(self._held), self._what,
                            exc_info=True)


class ChunkLeases(WorkerHook):
    """Renews the leases of the chunks this worker holds; restores lapsed ones.

    A hook: renewing starts when the worker is ready and stops with it. Does nothing
    when the Celery broker is not Redis (RabbitMQ redelivers on its own).

    Args:
        app: the worker's Celery app (its broker and transport options).
        settings: the lease length and the broker URL.
    """

    def __init__(self, app: Celery, settings: Settings) -> None:
        url = settings.celery_broker_url or settings.broker_url
        self.enabled = url.startswith(("redis://", "rediss://", "unix://"))
        options = app.conf.broker_transport_options or {}
        self._app = app
        self._index = chunk_lease_key(options)
        self._period_s = settings.chunk_lease_s / RENEWALS_PER_TTL
        broker = settings if url == settings.broker_url else \
            settings.model_copy(update={"redis_url": url})
        self._redis = redis_client(broker) if self.enabled else None
        self._connection: Any = None
        self._greenlet: gevent.Greenlet[Any, None] | None = None

    def worker_ready(self, consumer: Any) -> None:
        if self.enabled and self._greenlet is None:
            self._greenlet = gevent.spawn(self.run_forever)

    def worker_stopped(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
            self._greenlet = None

    def renew(self) -> int:
        """Renew the lease of every message held now; returns how many were renewed."""
        tags = [request.message.delivery_tag
                for request in list(worker_state.requests.values())
                if getattr(request, "message", None) is not None]
        if not tags or self._redis is None:
            return 0
        now = time.time()
        renewed = self._redis.zadd(self._index, dict.fromkeys(tags, now), xx=True, ch=True)
        return int(renewed or 0)

    def restore_lapsed(self) -> None:
        """Put messages whose lease lapsed back on their queue (kombu's restore)."""
        if self._connection is None:
            self._connection = self._app.connection_for_read()
        try:
            self._connection.default_channel.qos.restore_visible(num=None, interval=1)
        except Exception:
            self._connection.release()
            self._connection = None
            raise

    def run_forever(self) -> None:
        """Renew and restore every third of a lease until the process ends."""
        while True:
            gevent.sleep(self._period_s)
            try:
                self.renew()
                self.restore_lapsed()
            except Exception as exc:  # Redis away: the next round tries again
                log.warning("could not renew or restore chunk leases: %s", exc)
