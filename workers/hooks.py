"""Worker behaviour as hooks: small classes, one concern each, wired to Celery in one place.

dramatiq's middleware idea over Celery's signals. A hook overrides the moments it cares
about; :class:`WorkerHooks` calls every hook, in order, at each moment:

====================  ===========================================  ========================
moment                when                                         called from
====================  ===========================================  ========================
``worker_ready``      the consumer is connected and consuming      ``worker_ready`` signal
``worker_stopping``   a shutdown signal arrived; runs inside the   ``worker_shutting_down``
                      signal handler, so nothing here may block
``worker_stopped``    Celery finished its own shutdown             ``worker_shutdown``
``chunk_done``        a chunk was scored, before its results are   the chunk task
                      stored; retried across Redis outages
``chunk_failed``      a chunk failed as a whole (a malformed       the chunk task
                      message, or Redis gone for good)
``message_dropped``   a message no task can take (unknown task     ``task_unknown``,
                      name, not a task message at all)             ``task_rejected``
====================  ===========================================  ========================

The chunk moments are called by the task itself rather than from ``task_postrun``: what a
hook records there (dead letters) lands before the results are sent, and an outage
while recording holds the task instead of being swallowed by Celery's signal dispatch.
A failing hook never stops the hooks after it, except at ``chunk_done``, where an error
that outlasts the outage patience fails the chunk (its results were not all recorded).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import gevent
from celery.signals import (
    task_rejected,
    task_unknown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from rewardq.broker.connections import with_outage_retries
from rewardq.broker.schemas import ScoreChunk, ScoreResult
from rewardq.monitoring.metrics import WorkerMetrics, serve_worker_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkRun:
    """One delivery of a chunk task, as the hooks see it.

    Attributes:
        task_id: the Celery task id (``<job id>-<chunk index>``), when the message had one.
        worker: the Celery node name of this worker.
        args: the task's positional arguments as they arrived.
        received_at: unix time the task started.
        chunk: the parsed chunk of its valid items (``None``: malformed, or none valid).
    """

    task_id: str | None
    worker: str | None
    args: list[Any]
    received_at: float
    chunk: ScoreChunk | None = None

    def parsed(self, chunk: ScoreChunk | None) -> ChunkRun:
        """This run once its message parsed to ``chunk``."""
        return dataclasses.replace(self, chunk=chunk)


@dataclass(frozen=True)
class DroppedMessage:
    """A queue message no task could take.

    Attributes:
        reason: ``unknown task`` or ``rejected``.
        error: what was wrong with it.
        task_id: its task id, when it had one.
        args: its positional arguments (or whatever its body was, as one argument).
    """

    reason: str
    error: str
    task_id: str | None
    args: list[Any]


class WorkerHook:
    """Base of the worker's hooks: every moment does nothing until overridden."""

    def worker_ready(self, consumer: Any) -> None:
        """The Celery consumer ``consumer`` is connected and consuming."""

    def worker_stopping(self, exitcode: int) -> None:
        """A shutdown signal arrived (inside the signal handler: must not block)."""

    def worker_stopped(self) -> None:
        """Celery finished its shutdown."""

    def chunk_done(self, run: ChunkRun, results: Sequence[ScoreResult]) -> None:
        """``run`` was scored to ``results`` (one per item, in order), not yet stored.

        Raises:
            rewardq.broker.connections.OUTAGE_ERRORS: Redis is away; the moment is run again.
        """

    def chunk_failed(self, run: ChunkRun, reason: str, error: BaseException) -> None:
        """``run`` failed as a whole: ``reason`` is ``malformed`` or ``failed``."""

    def message_dropped(self, message: DroppedMessage) -> None:
        """A message that no task could take was dropped from the queue."""


class WorkerHooks:
    """A worker's hooks in order, and the one place that connects them to Celery.

    Args:
        hooks: the hooks; each moment calls them in this order.
        patience_s: how long the chunk moments retry a hook through a Redis outage
            (``Settings.redis_retry_s``).
    """

    def __init__(self, hooks: Sequence[WorkerHook], patience_s: float) -> None:
        self.hooks = tuple(hooks)
        self._patience_s = patience_s

    def connect_signals(self) -> None:
        """Connect Celery's worker signals to the hooks (once per worker process)."""
        worker_ready.connect(self._on_worker_ready, weak=False)
        worker_shutting_down.connect(self._on_shutting_down, weak=False)
        worker_shutdown.connect(self._on_shutdown, weak=False)
        task_unknown.connect(self._on_unknown_task, weak=False)
        task_rejected.connect(self._on_rejected, weak=False)

    def chunk_done(self, run: ChunkRun, results: Sequence[ScoreResult]) -> None:
        """Every hook's ``chunk_done``, each retried on its own through Redis outages.

        Raises:
            rewardq.broker.connections.OUTAGE_ERRORS: Redis stayed away longer than the patience.
        """
        for hook in self.hooks:
            with_outage_retries(partial(hook.chunk_done, run, results), self._patience_s,
                                sleep=gevent.sleep)

    def chunk_failed(self, run: ChunkRun, reason: str, error: BaseException) -> None:
        """Every hook's ``chunk_failed``, retried through outages; errors are logged."""
        self._each("chunk_failed", lambda hook: with_outage_retries(
            partial(hook.chunk_failed, run, reason, error), self._patience_s,
            sleep=gevent.sleep))

    def _each(self, moment: str, call: Callable[[WorkerHook], object]) -> None:
        for hook in self.hooks:
            try:
                call(hook)
            except Exception:  # one hook's failure must not stop the others, nor the worker
                log.exception("worker hook %s failed at %s", type(hook).__name__, moment)

    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        self._each("worker_ready", lambda hook: hook.worker_ready(sender))

    def _on_shutting_down(self, exitcode: int | None = 0, **_: Any) -> None:
        self._each("worker_stopping", lambda hook: hook.worker_stopping(exitcode or 0))

    def _on_shutdown(self, **_: Any) -> None:
        self._each("worker_stopped", lambda hook: hook.worker_stopped())

    def _on_unknown_task(self, message: Any = None, name: str | None = None,
                         id: str | None = None, **_: Any) -> None:
        dropped = _dropped(message, "unknown task", f"no task named {name!r}", id)
        self._each("message_dropped", lambda hook: hook.message_dropped(dropped))

    def _on_rejected(self, message: Any = None, exc: BaseException | None = None,
                     **_: Any) -> None:
        error = f"not a task message: {exc}" if exc else "not a task message"
        dropped = _dropped(message, "rejected", error, None)
        self._each("message_dropped", lambda hook: hook.message_dropped(dropped))


def _dropped(message: Any, reason: str, error: str, task_id: str | None) -> DroppedMessage:
    try:
        body = message.payload if message is not None else None
    except Exception as exc:  # an undecodable body: keep what can be said about it
        body = f"<undecodable body: {exc}>"
    args = body[0] if isinstance(body, list | tuple) and body else body
    return DroppedMessage(reason, error, task_id, args if isinstance(args, list) else [args])


class MetricsHook(WorkerHook):
    """Counts chunks and items, and serves the Prometheus endpoint once the worker is ready.

    Args:
        metrics: the worker process's metrics (shared with the runtime that counts calls).
        port: ``Settings.metrics_port``: where the endpoint listens; ``None`` = no endpoint.
        host: ``Settings.metrics_host``: the interface it binds (loopback unless set).
        fleet: a Redis client for the fleet-wide series (live workers, cache hits at
            submit) the endpoint also serves.
    """

    def __init__(self, metrics: WorkerMetrics, port: int | None,
                 fleet: Any = None, host: str = "127.0.0.1") -> None:
        self._metrics = metrics
        self._port = port
        self._host = host
        self._fleet = fleet

    def worker_ready(self, consumer: Any) -> None:
        if self._port is not None:
            serve_worker_metrics(self._metrics, self._port, node=consumer.hostname,
                                 addr=self._host, fleet=self._fleet)

    def chunk_done(self, run: ChunkRun, results: Sequence[ScoreResult]) -> None:
        self._metrics.chunk("ok", (r.status.value for r in results))

    def chunk_failed(self, run: ChunkRun, reason: str, error: BaseException) -> None:
        self._metrics.chunk(reason)
