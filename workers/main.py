"""The module Celery loads: ``celery -A rewardq.workers.main worker -P gevent``.

This is a worker's entry point, so it is where the environment is read. Its first act is
to announce the process as a starting worker (``rewardq.workers.heartbeat.announce_starting``),
before the imports of the scoring stack and Celery's own boot (seconds on a loaded
host): a producer that finds no live worker meanwhile waits for this one instead of
failing with ``NoWorkersError``.
"""

from rewardq.broker.settings import Settings
from rewardq.workers.heartbeat import announce_starting

settings = Settings()
announce_starting(settings)

from rewardq.workers.tasks import create_worker_app  # noqa: E402  (after the announcement)

app = create_worker_app(settings)
