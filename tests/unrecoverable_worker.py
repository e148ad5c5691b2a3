"""A worker app for tests only: rewardq's worker app, plus a consumer bootstep that fails
for good when the consumer reconnects, and then hangs Celery's shutdown.

Together they replay what a Redis restart once did to a worker: an error inside kombu
that Celery calls unrecoverable (``CRITICAL Unrecoverable error: AttributeError(...)``),
then a shutdown that never finished (Celery's gevent pool can block for ever closing the
broker connection, celery/celery#6111), leaving a process that neither consumed nor
exited. Both go through Celery's own extension point for consumer bootsteps; nothing
of Celery is patched. Load it with ``celery -A unrecoverable_worker worker`` (``tests/``
on ``PYTHONPATH``).
"""

from __future__ import annotations

from typing import Any

import gevent
from celery import bootsteps

from rewardq.broker.settings import Settings
from rewardq.workers.tasks import create_worker_app

app = create_worker_app(Settings())


class FailOnReconnect(bootsteps.StartStopStep):  # type: ignore[misc]
    """Raises a non-connection error when the consumer starts again after a broker loss,
    and then blocks the consumer's shutdown, as a broker close that never returns."""

    requires = ("celery.worker.consumer.connection:Connection",)
    failed = False

    def start(self, parent: Any) -> None:
        if parent.restart_count > 0:  # 0 on the first start, 1 after the first reconnect
            FailOnReconnect.failed = True
            raise AttributeError("'NoneType' object has no attribute 'hostname'")

    def shutdown(self, parent: Any) -> None:
        if FailOnReconnect.failed:
            gevent.sleep(3600)


app.steps["consumer"].add(FailOnReconnect)
