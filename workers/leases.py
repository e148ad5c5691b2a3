"""Chunk leases: a live worker keeps its chunks, a dead worker's go back to the queue.

The Redis transport hands an unacked message out again once its delivery time in
``unacked_index`` (``rewardq.broker.keys``) is older than the visibility timeout, which
``rewardq.broker.app`` sets to ``Settings.chunk_lease_s``. Every third of a lease,
:class:`ChunkLeases`

- bumps that time for every message this worker has reserved or is running
  (``ZADD XX``: a message acked meanwhile is not re-added), so a slow chunk is never
  handed out twice;
- runs kombu's own restore of lapsed messages. Kombu only does that on an idle poll of
  its synchronous loop, which the gevent pool never reaches while a BRPOP is pending
  (measured: a SIGKILLed worker's chunks stayed unacked for good).

A killed worker stops bumping, so its chunks return to the queue one lease later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
from celery import Celery
from celery.worker import state as worker_state

from rewardq.broker.connections import redis_client
from rewardq.broker.keys import chunk_lease_key
from rewardq.broker.settings import Settings
from rewardq.workers.hooks import WorkerHook

log = logging.getLogger(__name__)


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
        self._period_s = settings.chunk_lease_s / 3
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
