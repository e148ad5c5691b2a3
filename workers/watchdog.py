"""The shutdown watchdog: a worker that starts stopping ends, with Celery's exit status.

Celery decides to stop a worker in two ways:

- a shutdown signal (SIGTERM, SIGINT, SIGQUIT), announced by ``worker_shutting_down``
  with the exit status it means (0 for a warm shutdown);
- by itself: an unrecoverable error inside the consumer (``WorkController.start`` logs
  ``CRITICAL Unrecoverable error: ...`` and calls ``stop(exitcode=EX_FAILURE)``), or a
  remote-control shutdown (``stop(exitcode=0)``). No signal announces these; Celery only
  records its decision in ``WorkController.exitcode`` before it starts stopping.

Either way Celery's own shutdown can hang: its gevent pool can block for ever closing
the broker connection (celery/celery#6111), and after an unrecoverable error raised
inside kombu during a Redis restart a worker was seen logging the error and then
neither consuming nor answering ping, without exiting: a zombie no supervisor restarts.

So a *native* thread (the gevent hub may be the thing that is stuck) watches the
worker's exit status every ``poll_s`` from the moment it is ready. Once the worker is
stopping, it waits for the running tasks (they finish and ack; at most ``drain_s``
after a failure, when acks may have nowhere to go), then ``grace_s`` for Celery to
finish by itself, then closes the runtime and ends the process with the status Celery
chose: non-zero after an unrecoverable error, so a supervisor restarts the worker.
Nothing is lost by exiting: an unacked chunk goes back to the queue when its lease lapses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state
from gevent import monkey

from rewardq.workers.hooks import WorkerHook

log = logging.getLogger(__name__)


class ShutdownWatchdog(WorkerHook):
    """Ends the process once the worker is stopping and its running tasks are done.

    Args:
        close: releases the process's resources (``WorkerRuntime.close``) before exit.
        grace_s: how long Celery may take to finish by itself after the last task, when
            it stops on a failure.
        warm_grace_s: the most the same may take after a warm shutdown (status 0): the
            other hooks' last greenlets (the heartbeat's delete) run meanwhile, and the
            process ends as soon as ``settled`` says they are done.
        drain_s: how long running tasks may take after an unrecoverable error.
        poll_s: how often the worker's exit status is looked at.
        settled: whether the other hooks' shutdown work is done (called from this
            watchdog's native thread); without it every warm shutdown waits
            ``warm_grace_s`` in full.
    """

    def __init__(self, close: Callable[[], None], *, grace_s: float = 3.0,
                 warm_grace_s: float = 1.0, drain_s: float = 30.0, poll_s: float = 0.5,
                 settled: Callable[[], bool] | None = None) -> None:
        self._close = close
        self._settled = settled
        self._grace_s = grace_s
        self._warm_grace_s = warm_grace_s
        self._drain_s = drain_s
        self._poll_s = poll_s
        self._worker: Any = None
        self._exitcode: int | None = None
        self._watching = False

    @property
    def exitcode(self) -> int | None:
        """The status the process will end with, once the worker is stopping."""
        return self._exitcode

    def worker_ready(self, consumer: Any) -> None:
        self._worker = getattr(consumer, "controller", None)
        self._watch()

    def worker_stopping(self, exitcode: int) -> None:
        self.stop(exitcode)

    def stop(self, exitcode: int) -> None:
        """End the process with ``exitcode`` once the running tasks are done.

        Safe from a signal handler and from any thread; the first status given wins.
        """
        if self._exitcode is None:
            self._exitcode = exitcode
        self._watch()

    def _watch(self) -> None:
        if self._watching:
            return
        self._watching = True
        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        start_new_thread(self._run, ())

    def _run(self) -> None:
        sleep = monkey.get_original("time", "sleep")
        monotonic = monkey.get_original("time", "monotonic")
        while self._exitcode is None:
            decided = getattr(self._worker, "exitcode", None)
            if decided is not None:
                self._exitcode = int(decided)
                log.log(logging.CRITICAL if decided else logging.INFO,
                        "worker is stopping (exit status %s); the process ends once its "
                        "running tasks are done", decided)
                break
            sleep(self._poll_s)
        drain_until = monotonic() + self._drain_s if self._exitcode else None
        while worker_state.active_requests:
            if drain_until is not None and monotonic() >= drain_until:
                log.error("%d task(s) still running %.0f s after the worker failed; "
                          "their chunks go back to the queue when their leases lapse",
                          len(worker_state.active_requests), self._drain_s)
                break
            sleep(0.1)
        if self._exitcode:
            sleep(self._grace_s)
        else:  # a warm shutdown: until the other hooks are done, at most warm_grace_s
            until = monotonic() + self._warm_grace_s
            while monotonic() < until and not (self._settled is not None and self._settled()):
                sleep(0.02)
        try:
            self._close()
        except Exception:  # exiting anyway
            log.exception("could not close the worker runtime")
        log.info("worker process exits with status %s", self._exitcode)
        logging.shutdown()
        os._exit(self._exitcode or 0)
