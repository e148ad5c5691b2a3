"""Worker heartbeats: each worker process says, in Redis, that it is alive and what it consumes.

Once a worker is ready, a greenlet writes its ``WorkerBeat`` (node, pid, queues, times) to
``rewardq:worker:<node>`` every ``BEAT_INTERVAL_S`` with a TTL of ``BEAT_TTL_S`` and
deletes it on a clean shutdown; a killed worker's beat simply expires. Producers and the
CLI read the beats with ``broker.fleet.live_workers`` to tell "no worker is consuming this
queue" apart from "the workers are slow". Flower cannot: it reports a SIGKILLed worker as
online for minutes.

A beat that cannot be written (Redis away) is logged once per outage and never stops the
worker: the beat comes back with Redis.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import redis
from gevent.event import Event

from broker.connections import redis_client
from broker.fleet import BEAT_INTERVAL_S, BEAT_TTL_S, WorkerBeat
from broker.keys import WORKER_INDEX, worker_key
from broker.settings import Settings
from workers.hooks import WorkerHook

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
                    log.warning("worker heartbeat of %s not written (%s); producers will not "
                                "see this worker until Redis answers again", self.node, exc)
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


class HeartbeatHook(WorkerHook):
    """Beats while the worker is ready; deletes the beat when it stops.

    Args:
        settings: the Redis the beats go to.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.heartbeat: WorkerHeartbeat | None = None

    def worker_ready(self, consumer: Any) -> None:
        self.heartbeat = WorkerHeartbeat.for_worker(self._settings, consumer)
        self.heartbeat.start()

    def worker_stopping(self, exitcode: int) -> None:
        # Inside a signal handler: the delete runs in a greenlet of its own.
        if self.heartbeat is not None:
            self.heartbeat.stop_soon()

    def worker_stopped(self) -> None:  # also a shutdown without a signal (remote control)
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def settled(self) -> bool:
        """Nothing of this hook is left to do: the beat is deleted (or never written).
        Safe from any thread (``ShutdownWatchdog`` asks from a native one)."""
        return self.heartbeat is None or self.heartbeat.finished
