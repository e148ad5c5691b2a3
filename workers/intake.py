"""How a worker takes chunks off the queue: only as many as its judge slots can start on.

Celery's prefetch limit counts messages: a gevent worker with a pool of 64 takes up to 64
chunks at once, however few judge calls it may make (``Settings.max_concurrent_requests``).
At a step's start the first workers to poll take most of its chunks, and the others then
run out early: the step waits on the workers that hold too many, and a fleet-wide rate
limit goes partly unused (``benchmarks/PROFILE.md`` has the figures).

:class:`ChunkIntake` weighs chunks by their items instead. A worker takes another chunk
only while the items it holds (chunks received and not yet finished) are fewer than two
waves of its judge slots (``HELD_WAVES``): one wave being judged, one waiting for slots.
The rest of a step stays in the queue for whichever worker frees its slots first. One
chunk is always taken, however large.

When the gate closes, kombu's Redis transport pauses its BRPOP, and under gevent its poll
then sleeps for up to a second before it looks at the gate again (Celery's ``synloop``
polls with a 2 s timeout and kombu sleeps ``min(timeout, 1)`` with nothing to poll), so
a pool merely sized to the judge's slots idles. The consumer loop here waits on the gate
itself, and polls again within ``RECHECK_S`` of a chunk finishing.

A Celery consumer bootstep, so that it is installed again on every consumer (re)start.
Redis brokers only (the default): with RabbitMQ (``REWARDQ_CELERY_BROKER_URL``) the
broker keeps the prefetch count, in messages, and workers take chunks by that count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
from celery import bootsteps
from celery.worker import loops
from celery.worker import state as worker_state

#: How often a consumer whose gate is closed looks at it again.
RECHECK_S = 0.005
#: Items a worker holds, in judge waves (its judge slots): one being judged, one waiting
#: for slots as they free. Chunks end as a whole, so a worker that held only one wave
#: would leave the slots of a chunk's early-finished items idle until its slowest one.
HELD_WAVES = 2


def items_held() -> int:
    """Items of the chunks this worker process has received and not finished.

    Counted from Celery's own record of reserved requests, so a chunk that ends any way
    (scored, failed, revoked) stops counting without bookkeeping here. A message that is
    not a chunk counts as one item.
    """
    return sum(_items_in(request) for request in list(worker_state.reserved_requests))


def _items_in(request: Any) -> int:
    try:
        return max(1, len(request.args[0]["items"]))
    except (AttributeError, IndexError, KeyError, TypeError):
        return 1


class ChunkIntake(bootsteps.StartStopStep):  # type: ignore[misc]
    """The consumer bootstep gating chunk intake on judge slots (see the module).

    Configured with :meth:`for_slots`; Celery instantiates it with the consumer.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    #: Judge calls a worker process makes at once (``Settings.max_concurrent_requests``).
    slots = 1

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        #: Whether the consumer may take a message now: the gate and kombu's prefetch
        #: limit, once started.
        self.can_consume: Callable[[], bool] = self.has_room

    @classmethod
    def for_slots(cls, slots: int) -> type[ChunkIntake]:
        """This step for a worker that makes ``slots`` judge calls at once."""
        return type(cls.__name__, (cls,), {"slots": slots})

    def has_room(self) -> bool:
        """Whether the items this worker holds leave room for another chunk."""
        return items_held() < HELD_WAVES * self.slots

    def start(self, c: Any) -> None:
        if c.connection.transport.driver_type != "redis":
            # AMQP brokers keep the prefetch count themselves; nothing here to gate.
            return
        qos = c.task_consumer.channel.qos
        kombu_can_consume = qos.can_consume

        def can_consume() -> bool:
            return self.has_room() and kombu_can_consume()

        # The hook Celery's own worker_disable_prefetch uses: kombu's Redis transport asks
        # it before each BRPOP and before it delivers a reply.
        qos.can_consume = self.can_consume = can_consume
        # Gevent's loop; again on a restart (a step of the last start may have wrapped it).
        if c.loop is loops.synloop or getattr(c.loop, "__func__", None) is \
                ChunkIntake._synloop:
            c.loop = self._synloop

    def _synloop(self, obj: Any, connection: Any, *args: Any, **kwargs: Any) -> Any:
        return loops.synloop(obj, _GatedConnection(connection, self), *args, **kwargs)

    def wait_for_room(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (cooperatively) until the consumer may take a
        message, or the worker is asked to stop; whether it may."""
        deadline = time.monotonic() + timeout
        while not self.can_consume():
            if time.monotonic() >= deadline or _stopping():
                return False
            gevent.sleep(RECHECK_S)
        return True


def _stopping() -> bool:
    """A shutdown was asked for: the consumer loop must get back to Celery's checks."""
    return worker_state.should_stop not in (None, False) or \
        worker_state.should_terminate not in (None, False)


class _GatedConnection:
    """The consumer's connection as ``synloop`` sees it: ``drain_events`` waits on the
    gate while it is closed instead of in kombu's poll."""

    def __init__(self, connection: Any, intake: ChunkIntake) -> None:
        self._connection = connection
        self._intake = intake

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def drain_events(self, timeout: float | None = None) -> Any:
        if self._intake.wait_for_room(2.0 if timeout is None else timeout):
            return self._connection.drain_events(timeout=timeout)
        # Still full: let kombu do the upkeep of an idle poll, without its sleep; it
        # raises socket.timeout, which synloop expects of an idle poll.
        return self._connection.drain_events(timeout=0)
