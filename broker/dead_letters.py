"""Dead letters: work that failed for good, kept in Redis as data and replayable.

Redis schema (``rewardq.broker.keys``)::

    rewardq:dead:index            ZSET    letter id -> failed-at unix time
    rewardq:dead:<id>             STRING  JSON ``DeadLetter``; TTL ``Settings.dead_letter_ttl_s``
    rewardq:dead:fp:<sha256>      SET     ids of the item letters of one judge fingerprint;
                                          TTL ``Settings.dead_letter_ttl_s``, renewed per letter
    rewardq:stats:letters_cleared STRING  letters cleared by a later verdict (INCRBY)

A worker records a chunk's letters in one MULTI pipeline, which also trims index entries
older than the TTL; listing drops index entries whose body has expired since. Letter ids
are deterministic (``<task id>.<position>`` for an item, ``<task id>`` for a chunk), so a
chunk redelivered after a crash that fails again overwrites its letters instead of
doubling them.

A letter is about work, and the same work can succeed later: a judge outage fails an
item, then the gateway or the trainer sends it again and it gets its verdict. A letter
left behind would be a false failure: it would keep the dead-letter count up, and a
replay would judge again what already has a verdict. So an item letter that ended
``failed`` or ``budget_exceeded`` carries the judge fingerprint of its work
(``rewardq.broker.keys.judge_fingerprint``, of the item as the worker received it) and is
indexed under it; once a chunk holds a verdict for a fingerprint, one Lua script deletes
the letters indexed under it (bodies and index entries, atomically) and adds their number
to ``rewardq:stats:letters_cleared``. The worker sends that script in the same MULTI
pipeline as the chunk's own letters: one round trip per chunk, none for a chunk with
neither a letter nor a verdict (``settle``). ``invalid`` letters and chunk letters carry
no fingerprint and stay until replayed, purged or expired: what made them fail is in the
item or the message itself, so the same work does not succeed later. A letter recorded
just after the verdict that would have cleared it (two chunks of the same work racing)
stays too, until the next verdict for that work or its TTL.

Replay takes each letter out (GETDEL and ZREM in one MULTI) before sending its work
again, so two replays of one letter cannot both send it: the second finds nothing and
says so. Work that fails again is dead-lettered again, under the replay's task id. A
fingerprint set may still name letters replayed or purged since: clearing skips ids
whose body is gone, and the set expires with its letters.
"""

from __future__ import annotations

import builtins
import enum
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from celery import Celery, states
from pydantic import BaseModel, ConfigDict
from redis.exceptions import NoScriptError

from rewardq.broker.app import create_app
from rewardq.broker.connections import redis_client
from rewardq.broker.errors import BrokerUnavailableError, DeadLetterNotFound
from rewardq.broker.jobs import item_results, read_chunks, send_chunk
from rewardq.broker.keys import (
    DEAD_INDEX,
    DEAD_LETTERS_CLEARED,
    dead_fingerprint_key,
    dead_letter_key,
)
from rewardq.broker.settings import Settings

REPLAY_JOB_PREFIX = "replay-"
T = TypeVar("T")

#: Clears the letters indexed under fingerprint sets. KEYS: the index, the cleared
#: counter, then one set per fingerprint; ARGV[1]: the prefix of the letters' body keys.
#: Counts only the bodies it deleted (a set may name letters replayed or purged since).
#: The body keys are read from the sets, so they are not in KEYS: one Redis, no cluster.
_CLEAR_LUA = """
local cleared = 0
for i = 3, #KEYS do
  local ids = redis.call('SMEMBERS', KEYS[i])
  for _, id in ipairs(ids) do
    cleared = cleared + redis.call('DEL', ARGV[1] .. id)
    redis.call('ZREM', KEYS[1], id)
  end
  if #ids > 0 then redis.call('DEL', KEYS[i]) end
end
if cleared > 0 then redis.call('INCRBY', KEYS[2], cleared) end
return cleared
"""


class LetterKind(enum.StrEnum):
    """What a dead letter holds."""

    ITEM = "item"  #: one item of a chunk: its judge calls failed, or it was invalid
    CHUNK = "chunk"  #: a whole task message: malformed, or it failed as a whole


class DeadLetter(BaseModel):
    """One piece of work that failed for good, with everything needed to replay it.

    Attributes:
        id: ``<task id>.<position>`` for an item, ``<task id>`` for a chunk.
        kind: item or chunk.
        reason: short cause (``failed``, ``invalid``, ``malformed``, ``unknown task``, ...).
        error: the full error message.
        attempts: judge calls made for the item (0 when none was made).
        payload: the item's JSON for an item; the task's positional args for a chunk.
        spec: the ``JudgeSpec`` JSON the item was to be judged with (items only).
        fingerprint: the judge fingerprint of the item's work, for the letters that a
            later verdict for that work clears (``failed`` and ``budget_exceeded`` item
            letters); ``None`` for the others.
        received_at: when the worker received the work (unix time).
        failed_at: when it was dead-lettered (unix time).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    kind: LetterKind
    reason: str
    error: str
    attempts: int = 0
    job_id: str | None = None
    chunk_index: int | None = None
    position: int | None = None
    item_id: str | None = None
    step: int | None = None
    task_id: str | None = None
    worker: str | None = None
    payload: Any = None
    spec: dict[str, Any] | None = None
    fingerprint: str | None = None
    received_at: float | None = None
    failed_at: float


@dataclass(frozen=True)
class Replay:
    """What a replay sent: the new job and its tasks, and the letters taken out.

    Attributes:
        job_id: ``replay-<hex>``; task ids are ``<job_id>-<n>``.
        task_ids: one per re-enqueued task.
        replayed: ids of the letters re-enqueued (and removed).
        missing: ids asked for that another replay, a purge or expiry took meanwhile.
    """

    job_id: str
    task_ids: list[str] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class DeadLetters:
    """Record, list, show, replay and purge dead letters.

    Args:
        client: a Redis client on the rewardq database.
        settings: retention (``dead_letter_ttl_s``), ``chunk_size`` and
            ``chunk_deadline_s`` for replays, and the broker to replay through.
        app: the Celery app replays are sent with; built from ``settings`` when needed.
    """

    def __init__(self, client: redis.Redis, settings: Settings, app: Celery | None = None
                 ) -> None:
        self._redis = client
        self._settings = settings
        self._app = app
        self._own_app = False
        self._clear = client.register_script(_CLEAR_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> DeadLetters:
        """Dead letters in the Redis of ``settings`` (close it with ``close()``)."""
        return cls(redis_client(settings), settings)

    @property
    def app(self) -> Celery:
        """The Celery app replays are sent with."""
        if self._app is None:
            self._app = create_app(self._settings)
            self._own_app = True
        return self._app

    def close(self) -> None:
        """Release the Redis connections (and the Celery app, if built here)."""
        self._redis.close()
        if self._own_app and self._app is not None:
            self._app.close()

    def record(self, letters: Sequence[DeadLetter]) -> None:
        """Store ``letters`` with the retention period, in one MULTI pipeline.

        Raises:
            redis.RedisError: Redis is unreachable (the worker retries the chunk).
        """
        self.settle(letters, ())

    def settle(self, letters: Sequence[DeadLetter], succeeded: Iterable[str]) -> int:
        """Store ``letters``, and clear the letters of the judge fingerprints in
        ``succeeded`` (work that now has a verdict), in one MULTI pipeline: one round
        trip, none when both are empty. Returns how many letters were cleared.

        Clearing runs after the new letters are stored, so a letter for work that has a
        verdict already is cleared at once: the verdict supersedes it.

        Raises:
            redis.RedisError: Redis is unreachable (the worker retries the chunk).
        """
        fingerprints = list(dict.fromkeys(succeeded))
        if not letters and not fingerprints:
            return 0
        keys = [DEAD_INDEX, DEAD_LETTERS_CLEARED,
                *(dead_fingerprint_key(fp) for fp in fingerprints)]
        with self._redis.pipeline(transaction=True) as pipe:
            if letters:
                self._queue_record(pipe, letters)
            if fingerprints:
                pipe.evalsha(self._clear.sha, len(keys), *keys, dead_letter_key(""))
            replies = pipe.execute(raise_on_error=False)
        cleared = replies[-1] if fingerprints else 0
        if isinstance(cleared, NoScriptError):
            # First use on this Redis (or its script cache was flushed): the letters
            # above are stored; the script object loads the script and runs it.
            replies[-1] = cleared = self._clear(keys=keys, args=[dead_letter_key("")])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return int(cleared)

    def cleared(self) -> int:
        """How many letters later verdicts for the same work have cleared, in all.

        Raises:
            BrokerUnavailableError: Redis is unreachable.
        """
        return _redis_call(lambda: int(self._redis.get(DEAD_LETTERS_CLEARED) or 0))

    def _queue_record(self, pipe: redis.client.Pipeline, letters: Sequence[DeadLetter]) -> None:
        """Queue on ``pipe`` the commands storing ``letters`` (bodies, index, and the
        fingerprint sets of the letters that carry one)."""
        ttl = self._settings.dead_letter_ttl_s
        for letter in letters:
            pipe.set(dead_letter_key(letter.id), letter.model_dump_json(), ex=ttl)
            if letter.fingerprint is not None:
                fingerprint_key = dead_fingerprint_key(letter.fingerprint)
                pipe.sadd(fingerprint_key, letter.id)
                pipe.expire(fingerprint_key, ttl)
        pipe.zadd(DEAD_INDEX, {letter.id: letter.failed_at for letter in letters})
        pipe.zremrangebyscore(DEAD_INDEX, "-inf", f"({time.time() - ttl}")

    def count(self) -> int:
        """How many letters the index holds (expired ones included until the next list)."""
        return _redis_call(lambda: int(self._redis.zcard(DEAD_INDEX)))

    def list(self, limit: int | None = None) -> builtins.list[DeadLetter]:
        """Letters, newest first (at most ``limit``).

        Raises:
            BrokerUnavailableError: Redis is unreachable.
        """
        ids = self._ids(limit)
        return [letter for letter in self._load(ids) if letter is not None]

    def show(self, letter_id: str) -> DeadLetter:
        """The letter ``letter_id``.

        Raises:
            DeadLetterNotFound: no such letter (never was, replayed, purged or expired).
            BrokerUnavailableError: Redis is unreachable.
        """
        letter = self._load([letter_id])[0]
        if letter is None:
            raise DeadLetterNotFound(_not_found([letter_id]))
        return letter

    def replay(self, letter_ids: Iterable[str]) -> Replay:
        """Re-enqueue the letters ``letter_ids`` and remove them; nothing if one is unknown.

        Raises:
            DeadLetterNotFound: some id is not recorded (never was, already replayed,
                purged or expired); nothing was replayed.
            BrokerUnavailableError: Redis is unreachable; the letters are kept.
        """
        wanted = list(dict.fromkeys(letter_ids))
        unknown = [i for i, letter in zip(wanted, self._load(wanted), strict=True)
                   if letter is None]
        if unknown:
            raise DeadLetterNotFound(_not_found(unknown) + "; nothing was replayed")
        return self._replay(wanted)

    def replay_all(self) -> Replay:
        """Re-enqueue every letter and remove them (an empty ``Replay`` when none).

        Raises:
            BrokerUnavailableError: Redis is unreachable; the letters are kept.
        """
        return self._replay(self._ids(None))

    def purge(self, letter_ids: Iterable[str] | None = None) -> int:
        """Delete the letters ``letter_ids`` (all when ``None``); returns how many existed.

        Raises:
            BrokerUnavailableError: Redis is unreachable.
        """
        ids = list(letter_ids) if letter_ids is not None else self._ids(None)
        if not ids:
            return 0

        def delete() -> int:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(*(dead_letter_key(i) for i in ids))
                pipe.zrem(DEAD_INDEX, *ids)
                deleted, _ = pipe.execute()
            return int(deleted)

        return _redis_call(delete)

    def outcome(self, replay: Replay, timeout_s: float) -> Counter[str]:
        """Wait up to ``timeout_s`` for a replay's tasks; count its items by status.

        Items of tasks still running are counted as ``pending``; a task that failed as a
        whole (e.g. a malformed chunk) counts once as ``failed``.
        """
        pending = list(replay.task_ids)
        counts: Counter[str] = Counter()
        deadline = time.monotonic() + timeout_s
        while pending:
            for task_id, meta in read_chunks(self.app, self._redis, pending).items():
                pending.remove(task_id)
                if meta["status"] == states.SUCCESS:
                    counts.update(r["status"] for r in item_results(meta))
                else:
                    counts["failed"] += 1
            if pending and time.monotonic() >= deadline:
                counts["pending"] += len(pending)
                break
            time.sleep(0.05 if pending else 0)
        return counts

    def _replay(self, ids: Sequence[str]) -> Replay:
        job_id = f"{REPLAY_JOB_PREFIX}{uuid.uuid4().hex}"
        if not ids:
            return Replay(job_id)
        taken = self._take(ids)
        letters = [letter for letter in taken if letter is not None]
        replay = Replay(job_id, replayed=[letter.id for letter in letters],
                        missing=[i for i, letter in zip(ids, taken, strict=True)
                                 if letter is None])
        messages = self._messages(letters, job_id)
        for n, (args, _letters) in enumerate(messages):
            task_id = f"{job_id}-{n}"
            try:
                send_chunk(self.app, args, task_id)
            except BrokerUnavailableError as exc:
                unsent = [letter for _, rest in messages[n:] for letter in rest]
                self._keep(unsent)
                raise BrokerUnavailableError(
                    f"cannot re-enqueue dead letters ({n} of {len(messages)} task(s) sent, "
                    f"{len(unsent)} letter(s) kept): {exc}") from exc
            replay.task_ids.append(task_id)
        return replay

    def _messages(self, letters: Sequence[DeadLetter], job_id: str
                  ) -> builtins.list[tuple[builtins.list[Any], builtins.list[DeadLetter]]]:
        """Task args re-enqueueing ``letters`` (items regrouped into chunks), each with
        the letters it covers."""
        deadline = time.time() + self._settings.chunk_deadline_s
        groups: dict[tuple[str, int | None], builtins.list[DeadLetter]] = {}
        messages: builtins.list[tuple[builtins.list[Any], builtins.list[DeadLetter]]] = []
        for letter in letters:
            if letter.kind is LetterKind.ITEM:
                spec_key = json.dumps(letter.spec, sort_keys=True)
                groups.setdefault((spec_key, letter.step), []).append(letter)
            else:
                args = letter.payload if isinstance(letter.payload, list) else [letter.payload]
                messages.append((_refreshed(args, job_id, deadline), [letter]))
        size = self._settings.chunk_size
        for (spec_key, step), group in groups.items():
            for start in range(0, len(group), size):
                part = group[start:start + size]
                chunk = {"job_id": job_id, "chunk_index": len(messages), "step": step,
                         "spec": json.loads(spec_key),
                         "items": [letter.payload for letter in part], "deadline": deadline}
                messages.append(([chunk], part))
        return messages

    def _keep(self, letters: Sequence[DeadLetter]) -> None:
        """Record ``letters`` again (a replay that could not send them)."""
        _redis_call(lambda: self.record(letters))

    def _take(self, ids: Sequence[str]) -> builtins.list[DeadLetter | None]:
        def take() -> builtins.list[Any]:
            with self._redis.pipeline(transaction=True) as pipe:
                for letter_id in ids:
                    pipe.getdel(dead_letter_key(letter_id))
                pipe.zrem(DEAD_INDEX, *ids)
                return pipe.execute()[:-1]
        return [DeadLetter.model_validate_json(raw) if raw is not None else None
                for raw in _redis_call(take)]

    def _ids(self, limit: int | None) -> builtins.list[str]:
        end = -1 if limit is None else max(0, limit - 1)
        raw = _redis_call(lambda: self._redis.zrevrange(DEAD_INDEX, 0, end))
        return [i.decode() if isinstance(i, bytes) else str(i) for i in raw]

    def _load(self, ids: Sequence[str]) -> builtins.list[DeadLetter | None]:
        if not ids:
            return []
        raws = _redis_call(lambda: self._redis.mget([dead_letter_key(i) for i in ids]))
        expired = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if expired:  # bodies gone by TTL (or replayed meanwhile): drop their index entries
            _redis_call(lambda: self._redis.zrem(DEAD_INDEX, *expired))
        return [DeadLetter.model_validate_json(raw) if raw is not None else None
                for raw in raws]


def _redis_call(operation: Callable[[], T]) -> T:
    """``operation()``, with Redis errors raised as ``BrokerUnavailableError``."""
    try:
        return operation()
    except redis.RedisError as exc:
        raise BrokerUnavailableError(f"dead letters unreachable: {exc}") from exc


def _refreshed(args: list[Any], job_id: str, deadline: float) -> list[Any]:
    """A chunk message's args with a fresh job id and deadline, when it has them."""
    if len(args) == 1 and isinstance(args[0], dict) and "deadline" in args[0]:
        return [{**args[0], "job_id": job_id, "deadline": deadline}]
    return args


def _not_found(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
    return (f"no dead letter {shown} (never recorded, already replayed, purged or "
            f"expired)")
