"""The module Celery loads: ``celery -A workers.main worker -P gevent``.

This is a worker's entry point, so it is where the environment is read.
"""

from broker.settings import Settings
from workers.tasks import create_worker_app

app = create_worker_app(Settings())
