"""Which workers are alive, and which queues they consume: the read side of heartbeats.

Every worker process writes a ``WorkerBeat`` to ``rewardq:worker:<node>`` each
``BEAT_INTERVAL_S`` with a TTL of ``BEAT_TTL_S`` (``workers.heartbeat``), and adds its node
name to the ``rewardq:workers`` index. A worker that stops cleanly deletes its beat; one
that is killed stops renewing it, so it disappears within ``BEAT_TTL_S``. Redis's own TTL
decides liveness, so clocks of different hosts never have to agree.

The index exists so that asking costs one SMEMBERS and one MGET whatever the size of the
keyspace (a SCAN would walk every cached verdict). Readers prune members whose beat has
expired.
"""

from __future__ import annotations

import logging

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from broker.app import QUEUE_JUDGE
from broker.keys import WORKER_INDEX, worker_key

log = logging.getLogger(__name__)

BEAT_INTERVAL_S = 2.0
# Three missed beats: a worker busy for a moment stays listed, a killed one is gone in 6 s.
BEAT_TTL_S = 3 * BEAT_INTERVAL_S


class WorkerBeat(BaseModel):
    """One worker process's latest heartbeat, as stored in Redis (JSON).

    Attributes:
        node: Celery node name (``name@host``), unique in the fleet.
        pid: the worker process id on its host.
        queues: names of the queues it consumes right now.
        started_at: unix time it became ready.
        beat_at: unix time of this beat (the worker's clock).
    """

    # Unknown fields are ignored, so a newer worker still counts as alive to an older reader.
    model_config = ConfigDict(extra="ignore", frozen=True)

    node: str
    pid: int
    queues: tuple[str, ...]
    started_at: float
    beat_at: float


def live_workers(client: redis.Redis, queue: str | None = QUEUE_JUDGE) -> list[WorkerBeat]:
    """The workers whose heartbeat has not expired and that consume ``queue``.

    Args:
        client: a client of the Redis the workers use (``Settings.broker_url``).
        queue: keep only workers consuming this queue; ``None`` keeps every live worker.

    Returns:
        Their latest beats, sorted by node name; empty when none is alive.

    Raises:
        redis.ConnectionError, redis.TimeoutError: Redis could not be reached.
    """
    nodes = sorted(_text(n) for n in client.smembers(WORKER_INDEX))
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
