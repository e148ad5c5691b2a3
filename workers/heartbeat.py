"""Worker heartbeats: each worker process says, in Redis, that it is alive and what it consumes.

Once a worker is ready, a greenlet writes its ``WorkerBeat`` (node, pid, queues, times) to
``rewardq:worker:<node>`` every ``BEAT_INTERVAL_S`` with a TTL of ``BEAT_TTL_S`` and
deletes it on a clean shutdown; a killed worker's beat simply expires. Producers and the
CLI read the beats with ``rewardq.broker.fleet.live_workers`` to tell "no worker is consuming this
queue" apart from "the workers are slow". Flower cannot: it reports a SIGKILLed worker as
online for minutes.

A beat that cannot be written (Redis away, or full) is logged once per outage and never
stops the worker: the beat comes back with Redis. A full Redis is named as such ("Redis
is full (maxmemory N, used M)"), not as an outage.

Before that, from the moment the worker module starts loading (``rewardq.workers.main`` calls
:func:`announce_starting` before its heavy imports, and before Celery connects, starts its
pool and its consumer), :class:`StartingBeat` announces the process as ``starting``
(``rewardq.broker.fleet``), so a producer that finds no live worker yet waits for this one
instead of failing. The first real beat replaces it under the same key.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import redis
from celery.utils.nodenames import default_nodename, host_format
from gevent.event import Event

from rewardq.broker.app import QUEUE_JUDGE
from rewardq.broker.connections import describe_memory, is_redis_full, redis_client, redis_memory
from rewardq.broker.fleet import (
    BEAT_INTERVAL_S,
    BEAT_TTL_S,
    STARTING_MAX_S,
    STARTING_TTL_S,
    WorkerBeat,
)
from rewardq.broker.keys import WORKER_INDEX, worker_key
from rewardq.broker.settings import Settings
from rewardq.workers.hooks import WorkerHook

log = logging.getLogger(__name__)

QueueNames = Callable[[], Sequence[str] | None]


def consumed_queues(consumer: Any) -> list[str] | None:
    """Names of the queues a Celery consumer reads now (``celery inspect active_queues``).

    Reflects ``-Q`` / ``rewardq worker --queues`` and later ``add_consumer`` /
    ``cancel_consumer`` control commands. ``None`` while the consumer is reconnecting.
    """
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return None
    return [queue.name for queue in task_consumer.queues]


class WorkerHeartbeat:
    """The heartbeat of one worker process.

    Args:
        client: a client of the Redis producers read (``Settings.broker_url``).
        node: the worker's Celery node name (``name@host``).
        queues: returns the queue names consumed now, or ``None`` to keep the last ones.
        judge_calls: judge calls the worker makes at once (``max_concurrent_requests``).
        interval_s: time between beats.
        ttl_s: lifetime of one beat; a worker that misses beats for this long is gone.
    """

    def __init__(self, client: redis.Redis, node: str, queues: QueueNames, *,
                 judge_calls: int | None = None, interval_s: float = BEAT_INTERVAL_S,
                 ttl_s: float = BEAT_TTL_S) -> None:
        self.node = node
        self._judge_calls = judge_calls
        self._redis = client
        self._queues = queues
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._last_queues: tuple[str, ...] = ()
        self._started_at = time.time()
        self._stopping = Event()
        self._greenlet: gevent.Greenlet[Any, None] | None = None
        self._failing = False
        self._stopped = False
        #: ``stop()`` has done all it does (the beat deleted, or left to expire)
        self.finished = False

    @classmethod
    def for_worker(cls, settings: Settings, consumer: Any) -> WorkerHeartbeat:
        """The heartbeat of the worker whose Celery consumer is ``consumer`` (``worker_ready``)."""
        client = redis_client(settings, socket_timeout=5)
        return cls(client, consumer.hostname, lambda: consumed_queues(consumer),
                   judge_calls=settings.max_concurrent_requests)

    def beat(self) -> WorkerBeat:
        """Write one beat now and return it.

        Raises:
            redis.RedisError: the beat could not be written.
        """
        queues = self._queues()
        if queues is not None:
            self._last_queues = tuple(queues)
        beat = WorkerBeat(node=self.node, pid=os.getpid(), queues=self._last_queues,
                          started_at=self._started_at, beat_at=time.time(),
                          judge_calls=self._judge_calls)
        with self._redis.pipeline() as pipe:
            pipe.set(worker_key(self.node), beat.model_dump_json(), px=self._ttl_ms)
            pipe.sadd(WORKER_INDEX, self.node)
            pipe.execute()
        return beat

    def start(self) -> None:
        """Beat every interval in a greenlet of this process until ``stop()``."""
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self.run_until_stopped)

    def run_until_stopped(self) -> None:
        """Beat now and every interval until ``stop()``; Redis errors never end the loop."""
        while not self._stopping.is_set():
            try:
                self.beat()
            except Exception as exc:  # Redis away (or anything else): try again next beat
                if not self._failing:
                    _log_not_written(self._redis, self.node, exc)
                self._failing = True
            else:
                if self._failing:
                    log.warning("worker heartbeat of %s written again", self.node)
                self._failing = False
            self._stopping.wait(self._interval_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop beating and delete this worker's beat; idempotent, never raises.

        If Redis cannot be reached the beat is left to expire within its TTL.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._greenlet is not None:
            # Let a beat being written finish, so it cannot land after the delete.
            self._greenlet.join(timeout=timeout_s)
            self._greenlet.kill(block=False)
        try:
            with self._redis.pipeline() as pipe:
                pipe.delete(worker_key(self.node))
                pipe.srem(WORKER_INDEX, self.node)
                pipe.execute()
        except Exception as exc:  # it expires by itself
            log.info("worker heartbeat of %s not deleted (%s); it expires within %.0f s",
                     self.node, exc, self._ttl_ms / 1000)
        self._redis.close()
        self.finished = True

    def stop_soon(self) -> None:
        """``stop()`` in a new greenlet: safe from a signal handler, where no I/O may block."""
        gevent.spawn(self.stop)


def _log_not_written(client: redis.Redis, node: str, exc: BaseException) -> None:
    if is_redis_full(exc):
        used, maxmemory = redis_memory(client)
        log.warning("Redis is full (%s): worker heartbeat of %s not written; raise "
                    "maxmemory or free memory (docs/memory.md): producers will not see "
                    "this worker until Redis has room again", describe_memory(used, maxmemory),
                    node)
    else:
        log.warning("worker heartbeat of %s not written (%s); producers will not see this "
                    "worker until Redis answers again", node, exc)


def worker_argv_node(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(node name, queues)`` of the Celery worker started with ``argv`` (``-n`` /
    ``--hostname`` expanded as Celery does, ``-Q`` / ``--queues`` or the judge queue);
    ``None`` when ``argv`` does not start a worker."""
    if "worker" not in argv:
        return None
    name: str | None = None
    queues = QUEUE_JUDGE
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("-n", "--hostname") and value is not None:
            name = value
        elif arg.startswith("--hostname="):
            name = arg.split("=", 1)[1]
        elif arg in ("-Q", "--queues") and value is not None:
            queues = value
        elif arg.startswith("--queues="):
            queues = arg.split("=", 1)[1]
    return host_format(default_nodename(name)), [q for q in queues.split(",") if q]


class StartingBeat:
    """The ``starting`` beat of a worker process that is not ready yet.

    Written at once, then renewed every ``BEAT_INTERVAL_S`` by a greenlet (whenever the
    starting process lets it run) with a TTL of ``STARTING_TTL_S``, for at most
    ``STARTING_MAX_S``; :meth:`stop` ends it (the real beat then overwrites the key).
    Never raises: a starting beat that cannot be written only costs producers the
    wait it would have bought.

    Args:
        client: a client of the Redis producers read.
        node: the Celery node name the worker will have.
        queues: the queues it was told to consume.
        judge_calls: judge calls it will make at once.
    """

    def __init__(self, client: redis.Redis, node: str, queues: Sequence[str], *,
                 judge_calls: int | None = None) -> None:
        self.node = node
        self._redis = client
        self._beat = WorkerBeat(node=node, pid=os.getpid(), queues=tuple(queues),
                                started_at=time.time(), beat_at=time.time(),
                                judge_calls=judge_calls, starting=True)
        self._until = time.monotonic() + STARTING_MAX_S
        self._stopping = Event()
        self._greenlet: gevent.Greenlet[Any, None] | None = None

    def start(self) -> StartingBeat:
        """Write the beat now and keep renewing it in a greenlet."""
        self._write()
        self._greenlet = gevent.spawn(self._renew)
        return self

    def _write(self) -> None:
        beat = self._beat.model_copy(update={"beat_at": time.time()})
        try:
            with self._redis.pipeline() as pipe:
                pipe.set(worker_key(self.node), beat.model_dump_json(), px=int(
                    STARTING_TTL_S * 1000))
                pipe.sadd(WORKER_INDEX, self.node)
                pipe.execute()
        except Exception as exc:  # Redis away or full: producers will not wait for us
            _log_not_written(self._redis, self.node, exc)

    def _renew(self) -> None:
        while not self._stopping.wait(BEAT_INTERVAL_S):
            if time.monotonic() >= self._until:
                log.warning("worker %s still starting after %.0f s: no longer announced as "
                            "starting", self.node, STARTING_MAX_S)
                self._drop()
                return
            self._write()

    def stop(self, *, drop: bool) -> None:
        """Stop renewing; with ``drop``, delete the beat (a real beat will not replace it
        under this key)."""
        self._stopping.set()
        if self._greenlet is not None:
            self._greenlet.join(timeout=2)
            self._greenlet.kill(block=False)
        if drop:
            self._drop()

    def _drop(self) -> None:
        try:
            # Only our own starting beat: a real beat written meanwhile stays.
            raw = self._redis.get(worker_key(self.node))
            if raw is not None and WorkerBeat.model_validate_json(raw).starting:
                self._redis.delete(worker_key(self.node))
        except Exception:  # it expires by itself
            log.debug("starting beat of %s not deleted", self.node, exc_info=True)


#: The starting beat :func:`announce_starting` wrote, until a ``HeartbeatHook`` takes it.
_announced: StartingBeat | None = None


def announce_starting(settings: Settings, argv: Sequence[str] | None = None
                      ) -> StartingBeat | None:
    """Announce this process as a starting worker now, if its command line (``argv``,
    default ``sys.argv``) runs a Celery worker: the first thing the worker module does,
    before its heavy imports and Celery's boot, so that producers wait for it from the
    moment it exists. The :class:`HeartbeatHook` built later takes the beat over (and
    its real beat replaces it). Once per process; returns the beat, ``None`` when
    ``argv`` starts no worker."""
    global _announced
    if _announced is None:
        worker = worker_argv_node(sys.argv if argv is None else argv)
        if worker is not None:
            node, queues = worker
            _announced = StartingBeat(redis_client(settings, socket_timeout=5), node, queues,
                                      judge_calls=settings.max_concurrent_requests).start()
    return _announced


def _take_announced() -> StartingBeat | None:
    global _announced
    beat, _announced = _announced, None
    return beat


class HeartbeatHook(WorkerHook):
    """Announces the worker as starting (or takes over the starting beat
    :func:`announce_starting` wrote), beats while it is ready, deletes the beat when it
    stops.

    Args:
        settings: the Redis the beats go to.
        argv: the process's command line, read for the node name and queues of the
            ``starting`` beat (``sys.argv``; nothing is announced unless it runs a
            Celery worker).
    """

    def __init__(self, settings: Settings, argv: Sequence[str] | None = None) -> None:
        self._settings = settings
        self.heartbeat: WorkerHeartbeat | None = None
        self.starting: StartingBeat | None = _take_announced()
        worker = worker_argv_node(sys.argv if argv is None else argv)
        if self.starting is None and worker is not None:
            node, queues = worker
            self.starting = StartingBeat(redis_client(settings, socket_timeout=5), node,
                                         queues, judge_calls=settings.max_concurrent_requests)
            self.starting.start()

    def worker_ready(self, consumer: Any) -> None:
        self.heartbeat = WorkerHeartbeat.for_worker(self._settings, consumer)
        if self.starting is not None:
            self.starting.stop(drop=self.starting.node != self.heartbeat.node)
            self.starting = None
        self.heartbeat.start()

    def worker_stopping(self, exitcode: int) -> None:
        # Inside a signal handler: the delete runs in a greenlet of its own.
        if self.heartbeat is not None:
            self.heartbeat.stop_soon()
        if self.starting is not None:  # stopped before it was ever ready
            starting, self.starting = self.starting, None
            gevent.spawn(starting.stop, drop=True)

    def worker_stopped(self) -> None:  # also a shutdown without a signal (remote control)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.starting is not None:
            self.starting.stop(drop=True)
            self.starting = None

    def settled(self) -> bool:
        """Nothing of this hook is left to do: the beat is deleted (or never written).
        Safe from any thread (``ShutdownWatchdog`` asks from a native one)."""
        return self.heartbeat is None or self.heartbeat.finished
