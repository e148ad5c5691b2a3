"""The Celery task that scores a chunk, registered on the app ``broker.app`` builds."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down
from celery.worker import state as worker_state
from gevent import monkey
from pydantic import ValidationError

from broker.app import TASK_SCORE_CHUNK, create_app
from broker.schemas import ScoreChunk
from broker.settings import Settings
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class MalformedChunkError(ValueError):
    """A queue message that is not a valid ``ScoreChunk``; its items cannot be scored."""


def create_worker_app(settings: Settings) -> Celery:
    """The Celery app with the scoring task bound to one ``WorkerRuntime`` per process."""
    app = create_app(settings)
    runtime = WorkerRuntime(settings)

    @app.task(name=TASK_SCORE_CHUNK)  # type: ignore[untyped-decorator]
    def score_chunk(payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Score one chunk; returns one result JSON per item, in order."""
        try:
            chunk = ScoreChunk.model_validate(payload)
        except ValidationError as exc:
            raise MalformedChunkError(f"malformed chunk message: {exc}") from None
        # The gevent pool has no soft time limit: the bridge's wait is the limit.
        budget = max(1.0, chunk.deadline - time.time())
        results = runtime.score(chunk, timeout_s=budget + 5.0)
        return [r.model_dump(mode="json") for r in results]

    @worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def _exit_once_idle(**_: Any) -> None:
        start_watchdog(runtime)

    return app


def start_watchdog(runtime: WorkerRuntime, grace_s: float = 3.0) -> None:
    """Finish the process once running tasks are done and acked.

    Celery's gevent pool can hang for ever while closing the broker connection on warm
    shutdown (celery/celery#6111). By then every task has finished and been acked (late
    acks), so after a grace period this native thread closes our clients and exits.
    Nothing is lost: an unacked message is redelivered after the visibility timeout.
    """
    start_new_thread = monkey.get_original("_thread", "start_new_thread")
    sleep = monkey.get_original("time", "sleep")

    def watch() -> None:
        while worker_state.active_requests:
            sleep(0.1)
        sleep(grace_s)
        runtime.close()
        log.info("worker stopped after its running tasks finished")
        logging.shutdown()
        os._exit(0)

    start_new_thread(watch, ())

