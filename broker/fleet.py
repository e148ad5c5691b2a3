"""Which workers are alive, and which queues they consume: the read side of heartbeats.

Every worker process writes a ``WorkerBeat`` to ``rewardq:worker:<node>`` each
``BEAT_INTERVAL_S`` with a TTL of ``BEAT_TTL_S`` (``rewardq.workers.heartbeat``), and adds its node
name to the ``rewardq:workers`` index. A worker that stops cleanly deletes its beat; one
that is killed stops renewing it, so it disappears within ``BEAT_TTL_S``. Redis's own TTL
decides liveness, so clocks of different hosts never have to agree.

The index exists so that asking costs one SMEMBERS and one MGET whatever the size of the
keyspace (a SCAN would walk every cached verdict). Readers prune members whose beat has
expired.

A worker process also announces itself while it is still starting (importing, connecting,
starting its pool: seconds on a loaded host), with a ``starting`` beat under the same key
and a longer TTL (``STARTING_TTL_S``), which its first real beat replaces. Starting
workers consume nothing yet, so :func:`live_workers` leaves them out;
:func:`fleet_counts` counts them apart, so that a producer waits for a worker that is
coming instead of failing with ``NoWorkersError`` a second before it takes the chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from rewardq.broker.app import QUEUE_JUDGE
from rewardq.broker.connections import reply_text
from rewardq.broker.keys import WORKER_INDEX, worker_key

log = logging.getLogger(__name__)

BEAT_INTERVAL_S = 2.0
# Three missed beats: a worker busy for a moment stays listed, a killed one is gone in 6 s.
BEAT_TTL_S = 3 * BEAT_INTERVAL_S
#: Judge rounds a chunk may last at most on the worker making the fewest calls at once.
CHUNK_ROUNDS = 8
#: Lifetime of a starting worker's beat: the gaps between its renewals are long while
#: the process imports (CPU-bound, nothing else runs), and a worker that dies starting
#: stops being waited for this long after its last renewal.
STARTING_TTL_S = 30.0
#: A worker still starting after this long stops announcing itself (something is wrong
#: with it; producers go back to failing fast).
STARTING_MAX_S = 120.0


class WorkerBeat(BaseModel):
    """One worker process's latest heartbeat, as stored in Redis (JSON).

    Attributes:
        node: Celery node name (``name@host``), unique in the fleet.
        pid: the worker process id on its host.
        queues: names of the queues it consumes right now.
        started_at: unix time it became ready.
        beat_at: unix time of this beat (the worker's clock).
        judge_calls: judge calls it makes at once (``Settings.max_concurrent_requests``);
            ``None`` from a worker that does not say.
        starting: the process is still starting: it consumes nothing yet, and ``queues``
            are the ones it was told to consume (its beat is replaced once it is ready).
    """

    # Unknown fields are ignored, so a newer worker still counts as alive to an older reader.
    model_config = ConfigDict(extra="ignore", frozen=True)

    node: str
    pid: int
    queues: tuple[str, ...]
    started_at: float
    beat_at: float
    judge_calls: int | None = None
    starting: bool = False


def live_workers(client: redis.Redis, queue: str | None = QUEUE_JUDGE) -> list[WorkerBeat]:
    """The workers whose heartbeat has not expired and that consume ``queue``.

    Args:
        client: a client of the Redis the workers use (``Settings.broker_url``).
        queue: keep only workers consuming this queue; ``None`` keeps every live worker.

    Returns:
        Their latest beats, sorted by node name; empty when none is alive. Workers still
        starting are not among them (:func:`fleet_counts` counts those).

    Raises:
        redis.ConnectionError, redis.TimeoutError: Redis could not be reached.
    """
    return [beat for beat in _beats(client, queue) if not beat.starting]


def fleet_counts(client: redis.Redis, queue: str | None = QUEUE_JUDGE) -> tuple[int, int]:
    """``(live, starting)``: workers consuming ``queue`` now, and worker processes still
    starting that were told to consume it (one SMEMBERS and one MGET).

    Raises:
        redis.ConnectionError, redis.TimeoutError: Redis could not be reached.
    """
    beats = _beats(client, queue)
    starting = sum(1 for beat in beats if beat.starting)
    return len(beats) - starting, starting


def _beats(client: redis.Redis, queue: str | None) -> list[WorkerBeat]:
    nodes = sorted(reply_text(n) for n in client.smembers(WORKER_INDEX))
    if not nodes:
        return []
    raws = client.mget([worker_key(n) for n in nodes])
    expired = [n for n, raw in zip(nodes, raws, strict=True) if raw is None]
    if expired:
        # A worker beating again right now re-adds itself with its next beat.
        client.srem(WORKER_INDEX, *expired)
    beats = []
    for node, raw in zip(nodes, raws, strict=True):
        if raw is None:
            continue
        try:
            beat = WorkerBeat.model_validate_json(raw)
        except ValidationError as exc:
            log.warning("ignoring unreadable heartbeat of %s: %s", node, exc)
            continue
        if queue is None or queue in beat.queues:
            beats.append(beat)
    return beats


def chunk_size_for(configured: int, beats: Sequence[WorkerBeat]) -> int:
    """Items per chunk for a fleet: ``configured``, or fewer where a worker makes so few
    judge calls at once that a chunk would last more than ``CHUNK_ROUNDS`` rounds of them.

    A worker holds a chunk until its last item is judged (``rewardq.workers.intake``), so the
    chunks still running when a step's queue empties decide its tail: at 1 call per
    process a chunk of 64 is 64 judge latencies, which the other workers, out of work,
    spend idle (measured: a 3,000 RPM limit used at 0.96 of what 4 such workers could
    reach). With no worker saying, ``configured``.
    """
    calls = [beat.judge_calls for beat in beats if beat.judge_calls]
    if not calls:
        return configured
    return max(1, min(configured, CHUNK_ROUNDS * min(calls)))


