"""The Celery app both sides build from ``Settings``: JSON only, late acks, one queue.

Configured here and nowhere else. The producer only sends ``TASK_SCORE_CHUNK`` by name;
the workers register the task body on an app built by the same function.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from rewardq.broker.settings import Settings

TASK_SCORE_CHUNK = "rewardq.score_chunk"
QUEUE_JUDGE = "rewardq.judge"
#: The result backend class of every app (``rewardq.broker.jobs``, named here: that module
#: imports this one): Celery's Redis backend, retrying through a full Redis too.
RESULT_BACKEND_CLASS = "rewardq.broker.jobs:FullAwareRedisBackend"


def result_backend_url(backend: str) -> str:
    """The URL of a result backend setting, without a ``<class>+`` prefix."""
    head, plus, url = backend.partition("+")
    return url if plus and "://" not in head else backend


def create_app(settings: Settings) -> Celery:
    """A Celery app for ``settings``: Redis broker and backend, JSON serialization only.

    Late acks with reject-on-worker-lost mean a chunk whose worker dies is redelivered
    instead of lost. Chunks are leased: the visibility timeout is ``chunk_lease_s``, and
    a live worker renews the lease of every chunk it holds (``rewardq.workers.leases.ChunkLeases``),
    so a slow but live chunk is never handed out twice while a dead worker's chunks go
    to another worker within about one lease.
    """
    url = settings.broker_url
    # Every greenlet of a gevent worker may hold a connection at once (acks, results).
    max_connections = 2 * settings.worker_concurrency + 32
    # Celery's "<backend class>+<url>" form, for a redis:// or rediss:// URL; any other
    # is left to Celery's own backend.
    backend = f"{RESULT_BACKEND_CLASS}+{url}" if url.startswith(("redis://", "rediss://")) \
        else url
    app = Celery("rewardq", broker=settings.celery_broker_url or url, backend=backend,
                 set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A STARTED result marks a chunk a worker holds, so the producer can tell a
        # chunk Redis lost (no queue entry, no lease, no result) from one in progress.
        task_track_started=True,
        task_queues=[Queue(QUEUE_JUDGE, routing_key=QUEUE_JUDGE)],  # type: ignore[no-untyped-call]
        task_default_queue=QUEUE_JUDGE,
        task_routes={TASK_SCORE_CHUNK: {"queue": QUEUE_JUDGE}},
        result_expires=settings.result_expires_s,
        broker_transport_options={
            "visibility_timeout": settings.chunk_lease_s,
            # A worker killed inside kombu's restore must not block every restore for the
            # default 5 minutes; restoring is a WATCHed transaction, safe without the mutex.
            "unacked_mutex_expire": max(1.0, settings.chunk_lease_s),
            "max_connections": max_connections,
        },
        redis_max_connections=max_connections,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        # A worker storing a chunk's state or results through a Redis blip retries instead
        # of storing the blip as the chunk's failure (Celery retries store_result's
        # GET-then-SET only when asked); about Settings.redis_retry_s in all.
        result_backend_always_retry=True,
        result_backend_max_retries=max(10, int(2 * settings.redis_retry_s)),
        result_backend_max_sleep_between_retries_ms=1000,
        broker_connection_retry_on_startup=True,
        # gevent patches threading.local, so a per-thread result backend is one backend
        # (and one Redis pool) per greenlet: ~130 new connections per 2048-item step and
        # results stored behind a connection handshake. Share one (redis-py pools are).
        result_backend_thread_safe=True,
        worker_send_task_events=True,
        # No task-sent event: it doubled the producer's publishes (one Redis round trip
        # each) for Flower to list chunks still queued; the queue depth shows those.
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app
