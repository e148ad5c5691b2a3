"""The dead-letter hook: what a worker could not score is kept in Redis, replayable.

- Items that end ``failed``, ``invalid`` or ``budget_exceeded`` become item letters, one
  MULTI pipeline per chunk, before the chunk's results are stored (a Redis outage holds
  the chunk: the hooks retry it, ``rewardq.workers.hooks``). A ``budget_exceeded`` item was never
  judged: ``rewardq failed replay`` scores it once the budget is raised.
- A chunk that fails as a whole (a malformed message, or Redis gone for good) becomes a
  chunk letter holding the task's arguments.
- A message no task can take (unknown task name, not a task message) becomes a chunk
  letter too; recording it is best effort, so a bad message never takes the consumer down.

The registry and its schema live in ``rewardq.broker.dead_letters``; this module only decides
what becomes a letter. Every letter recorded is counted in the worker's metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rewardq.broker.dead_letters import DeadLetter, DeadLetters, LetterKind
from rewardq.broker.schemas import ResultStatus, ScoreChunk, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.monitoring.metrics import WorkerMetrics
from rewardq.workers.hooks import ChunkRun, DroppedMessage, WorkerHook

#: Item statuses that become dead letters.
LETTERED = frozenset({ResultStatus.FAILED, ResultStatus.INVALID,
                      ResultStatus.BUDGET_EXCEEDED})


class DeadLetterHook(WorkerHook):
    """Records dead letters for what a worker could not score.

    Args:
        settings: the Redis to record in and the letters' retention.
        metrics: counts every letter recorded, by kind.
    """

    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._letters: DeadLetters | None = None

    @property
    def letters(self) -> DeadLetters:
        """The registry, built on first use (inside the worker process, after gevent)."""
        if self._letters is None:
            self._letters = DeadLetters.from_settings(self._settings)
        return self._letters

    def chunk_done(self, run: ChunkRun, results: Sequence[ScoreResult]) -> None:
        self._record(item_letters(run, results))

    def chunk_failed(self, run: ChunkRun, reason: str, error: BaseException) -> None:
        chunk = run.chunk
        message = str(error) if reason == "malformed" else f"{type(error).__name__}: {error}"
        self._record([DeadLetter(
            id=run.task_id or f"unknown-{time.time_ns()}", kind=LetterKind.CHUNK,
            reason=reason, error=message, job_id=chunk.job_id if chunk else None,
            chunk_index=chunk.chunk_index if chunk else None,
            step=chunk.step if chunk else None, task_id=run.task_id, worker=run.worker,
            payload=run.args, received_at=run.received_at, failed_at=time.time())])

    def message_dropped(self, message: DroppedMessage) -> None:
        self._record([DeadLetter(
            id=message.task_id or f"message-{time.time_ns()}", kind=LetterKind.CHUNK,
            reason=message.reason, error=message.error, task_id=message.task_id,
            payload=message.args, failed_at=time.time())])

    def worker_stopped(self) -> None:
        if self._letters is not None:
            self._letters.close()
            self._letters = None

    def _record(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        self.letters.record(letters)
        for letter in letters:
            self._metrics.dead_letter(letter.kind.value)


def item_letters(run: ChunkRun, results: Sequence[ScoreResult]) -> list[DeadLetter]:
    """One letter per item of ``run``'s message that ended in a :data:`LETTERED` status.

    Args:
        run: the chunk task (its message's items in ``args[0]["items"]``).
        results: one result per item of the message, in order.
    """
    payload: dict[str, Any] = run.args[0]
    chunk: ScoreChunk | None = run.chunk
    now = time.time()
    letters = []
    for position, (raw, result) in enumerate(zip(payload["items"], results, strict=True)):
        if result.status not in LETTERED:
            continue
        job_id = payload.get("job_id")
        letters.append(DeadLetter(
            id=f"{run.task_id}.{position}", kind=LetterKind.ITEM, reason=result.status.value,
            error=result.error or "", attempts=result.attempts,
            job_id=chunk.job_id if chunk else job_id if isinstance(job_id, str) else None,
            chunk_index=chunk.chunk_index if chunk else None, position=position,
            item_id=result.id, step=chunk.step if chunk else None, task_id=run.task_id,
            worker=run.worker, payload=raw,
            spec=chunk.spec.model_dump(mode="json") if chunk else payload.get("spec"),
            received_at=run.received_at, failed_at=now))
    return letters
