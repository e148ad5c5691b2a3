"""Worker heartbeats with real parts: gevent worker processes beat into a real Redis, and
``live_workers`` tells who is alive and what each consumes (issue 9: no silent waiting).
A worker process announces itself as starting before its heavy imports and Celery's boot,
and a producer waits for it; with no worker at all, it still fails fast."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gevent
import pytest
import redis
from conftest import ROOT, worker_logs
from redis.backoff import NoBackoff
from redis.retry import Retry
from scoring_data import make_items

from rewardq.broker.app import QUEUE_JUDGE, create_app
from rewardq.broker.errors import NoWorkersError, ScoringTimeoutError
from rewardq.broker.fleet import BEAT_TTL_S, WorkerBeat, fleet_counts, live_workers
from rewardq.broker.keys import WORKER_INDEX, worker_key
from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.producer.client import NO_WORKER_GRACE_S, RewardClient
from rewardq.stack import JudgeProcess, settings_env, stop_process, wait_for_workers
from rewardq.workers.heartbeat import WorkerHeartbeat

OTHER_QUEUE = "rewardq.other"


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(settings.broker_url)
    yield c
    c.close()


def poll(read: Callable[[], list[WorkerBeat]], done: Callable[[list[WorkerBeat]], bool],
         timeout_s: float = 20.0) -> list[WorkerBeat]:
    """``read()`` until ``done`` holds or ``timeout_s`` passes; the last reading."""
    deadline = time.monotonic() + timeout_s
    beats = read()
    while not done(beats) and time.monotonic() < deadline:
        time.sleep(0.2)
        beats = read()
    return beats


def short(beats: list[WorkerBeat]) -> set[str]:
    return {b.node.split("@")[0] for b in beats}


def test_two_workers_beat_with_their_pid_and_the_judge_queue(
        settings: Settings, workers, client: redis.Redis, tmp_path: Path) -> None:
    procs = workers(2)

    beats = poll(lambda: live_workers(client), lambda b: len(b) == 2)

    assert short(beats) == {"w0", "w1"}, worker_logs(tmp_path)
    assert {b.pid for b in beats} == {p.pid for p in procs}
    assert all(b.queues == (QUEUE_JUDGE,) for b in beats)
    assert all(b.started_at <= b.beat_at for b in beats)
    assert {b.judge_calls for b in beats} == {settings.max_concurrent_requests}
    # The beat is renewed: a later reading carries a later beat time.
    first = {b.node: b.beat_at for b in beats}
    later = poll(lambda: live_workers(client),
                 lambda b: all(x.beat_at > first[x.node] for x in b) and len(b) == 2)
    assert all(b.beat_at > first[b.node] for b in later)


def test_a_killed_worker_disappears_and_the_other_stays(
        settings: Settings, workers, client: redis.Redis) -> None:
    victim, survivor = workers(2)
    beats = poll(lambda: live_workers(client), lambda b: len(b) == 2)
    node = {b.pid: b.node for b in beats}[victim.pid]

    victim.kill()
    victim.wait()
    beats = poll(lambda: live_workers(client), lambda b: node not in {x.node for x in b},
                 timeout_s=BEAT_TTL_S + 15)

    assert [b.pid for b in beats] == [survivor.pid]
    assert client.exists(worker_key(node)) == 0
    assert node.encode() not in client.smembers(WORKER_INDEX)  # the reader pruned it


@contextmanager
def key_events(client: redis.Redis, key: str) -> Iterator[Callable[[], str]]:
    """Redis keyspace notifications for ``key``: ``first()`` waits for its first ``del`` or
    ``expired`` event and names it. Deleted or expired tells itself, however long a loaded
    machine takes to stop a worker: no clock involved."""
    db = client.connection_pool.connection_kwargs.get("db", 0)
    client.config_set("notify-keyspace-events", "Kgx")  # keyspace: generic commands, expiry
    pubsub = client.pubsub()
    pubsub.subscribe(f"__keyspace@{db}__:{key}")

    def first() -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message and message["type"] == "message" and \
                    message["data"] in (b"del", b"expired"):
                return str(message["data"].decode())
        raise AssertionError(f"{key} was neither deleted nor expired within 60 s")

    try:
        yield first
    finally:
        pubsub.close()
        client.config_set("notify-keyspace-events", "")


def test_a_cleanly_stopped_worker_deletes_its_beat(
        settings: Settings, workers, client: redis.Redis) -> None:
    (proc,) = workers(1)
    (beat,) = poll(lambda: live_workers(client), lambda b: len(b) == 1)
    with key_events(client, worker_key(beat.node)) as first_event:
        proc.terminate()
        proc.wait(timeout=60)
        assert first_event() == "del"  # deleted by the worker, not lapsed

    assert proc.returncode == 0
    assert client.exists(worker_key(beat.node)) == 0
    assert live_workers(client, queue=None) == []


def test_a_worker_stopped_by_remote_control_deletes_its_beat(
        settings: Settings, workers, client: redis.Redis) -> None:
    (proc,) = workers(1)
    (beat,) = poll(lambda: live_workers(client), lambda b: len(b) == 1)
    with key_events(client, worker_key(beat.node)) as first_event:
        app = create_app(settings)
        app.control.shutdown(destination=[beat.node])  # `celery control shutdown`: no signal
        app.close()
        proc.wait(timeout=60)
        assert first_event() == "del"

    assert client.exists(worker_key(beat.node)) == 0


def test_a_queue_added_at_run_time_shows_in_the_next_beat(
        settings: Settings, workers, client: redis.Redis) -> None:
    workers(1)
    (beat,) = poll(lambda: live_workers(client), lambda b: len(b) == 1)

    app = create_app(settings)
    app.control.add_consumer(OTHER_QUEUE, destination=[beat.node], reply=True, timeout=5)
    app.close()
    beats = poll(lambda: live_workers(client, queue=OTHER_QUEUE), lambda b: len(b) == 1)

    assert [(b.node, set(b.queues)) for b in beats] == [(beat.node, {QUEUE_JUDGE, OTHER_QUEUE})]


def test_a_worker_on_another_queue_is_not_a_judge_worker(
        settings: Settings, workers, client: redis.Redis, tmp_path: Path) -> None:
    (judge_worker,) = workers(1)
    # What a user runs: `rewardq worker --queues rewardq.other`.
    log = open(tmp_path / "other.log", "ab")  # noqa: SIM115
    other = subprocess.Popen(
        [str(Path(sys.executable).parent / "rewardq"), "worker", "--queues", OTHER_QUEUE,
         "--name", "other@%h", "--loglevel", "WARNING", "--concurrency", "4"],
        env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_workers(settings, ["other"], processes=[other])
        everyone = poll(lambda: live_workers(client, queue=None), lambda b: len(b) == 2)

        assert short(everyone) == {"w0", "other"}, (tmp_path / "other.log").read_text()
        assert [b.pid for b in live_workers(client)] == [judge_worker.pid]
        (on_other,) = live_workers(client, queue=OTHER_QUEUE)
        assert on_other.pid == other.pid and on_other.queues == (OTHER_QUEUE,)
    finally:
        stop_process(other, grace_s=15)
        log.close()


def test_readers_skip_and_prune_beats_that_expired_or_cannot_be_read(
        client: redis.Redis) -> None:
    alive = WorkerHeartbeat(client, "alive@h", lambda: [QUEUE_JUDGE, OTHER_QUEUE])
    alive.beat()
    client.sadd(WORKER_INDEX, "expired@h")  # indexed, but its beat is gone
    client.sadd(WORKER_INDEX, "garbled@h")
    client.set(worker_key("garbled@h"), "{not json", ex=60)

    beats = live_workers(client)

    assert [(b.node, b.queues) for b in beats] == [("alive@h", (QUEUE_JUDGE, OTHER_QUEUE))]
    assert b"expired@h" not in client.smembers(WORKER_INDEX)
    assert 0 < client.pttl(worker_key("alive@h")) <= BEAT_TTL_S * 1000
    assert live_workers(client, queue="rewardq.nobody") == []


def test_a_stopped_heartbeat_deletes_its_beat_and_keeps_queues_while_reconnecting(
        client: redis.Redis) -> None:
    answers: list[list[str] | None] = [[QUEUE_JUDGE], None]
    heartbeat = WorkerHeartbeat(client, "w@h", lambda: answers.pop(0) if answers else None)
    heartbeat.beat()
    again = heartbeat.beat()  # the consumer is reconnecting: the last queues stand

    assert again.queues == (QUEUE_JUDGE,)
    heartbeat.stop()
    heartbeat.stop()  # idempotent
    assert client.exists(worker_key("w@h")) == 0
    assert client.smembers(WORKER_INDEX) == set()


def test_an_unreachable_redis_is_logged_once_and_never_ends_the_beat(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dead = redis.Redis(port=port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    attempts = 0

    def queues() -> list[str]:
        nonlocal attempts
        attempts += 1
        return [QUEUE_JUDGE]

    heartbeat = WorkerHeartbeat(dead, "w@h", queues, interval_s=0.01)
    caplog.set_level(logging.DEBUG, logger="rewardq.workers.heartbeat")
    heartbeat.start()
    gevent.sleep(0.5)
    still_beating = attempts
    gevent.sleep(0.2)

    assert still_beating >= 5 and attempts > still_beating
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "w@h" in warnings[0].getMessage()
    heartbeat.stop(timeout_s=2)  # cannot delete: logged, not raised


#: A worker module whose scoring stack takes as long to import as the test wants (a
#: loaded host): ``rewardq.workers.main`` as Celery loads it, the import of
#: ``rewardq.workers.tasks`` held back by a finder in front of the real ones until the file
#: ``go`` exists.
SLOW_BOOT = """
import importlib.abc
import os
import sys
import time


class SlowImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "rewardq.workers.tasks":
            sys.meta_path.remove(self)
            give_up = time.monotonic() + 300
            while not os.path.exists({go!r}) and time.monotonic() < give_up:
                time.sleep(0.1)  # gevent's, under -P gevent: the starting beat renews
        return None


sys.meta_path.insert(0, SlowImport())
from rewardq.workers.main import app  # noqa: E402
"""


def test_a_worker_slow_to_boot_is_starting_and_a_submit_sent_meanwhile_waits_for_it(
        settings: Settings, judge: JudgeProcess, client: redis.Redis, tmp_path: Path) -> None:
    """The starting beat is written before the worker's heavy imports: while they are
    held back the worker is seen as starting, and a submit sent then waits for it past
    the producer's grace (its wait runs out as a timeout, not NoWorkersError) and is
    scored once the worker is up."""
    go = tmp_path / "go"
    (tmp_path / "slow_boot.py").write_text(SLOW_BOOT.format(go=str(go)))
    env = settings_env(settings, {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    log = open(tmp_path / "w-slow.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "slow_boot", "worker", "-P", "gevent", "-c",
         "8", "-Q", QUEUE_JUDGE, "-n", "slow@%h", "--loglevel", "WARNING",
         "--without-mingle"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while fleet_counts(client) == (0, 0) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.1)
        counts = fleet_counts(client)
        (node,) = client.smembers(WORKER_INDEX) or {b"-"}
        raw = client.get(worker_key(node.decode()))
        assert counts == (0, 1) and raw is not None, worker_logs(tmp_path)
        beat = WorkerBeat.model_validate_json(raw)
        assert beat.starting and beat.pid == proc.pid and beat.queues == (QUEUE_JUDGE,)
        assert live_workers(client) == []  # it consumes nothing yet

        items = make_items(20, "slow-boot")
        with RewardClient(settings) as producer:
            pending = producer.submit(items)
            with pytest.raises(ScoringTimeoutError):  # waited for the starting worker
                pending.result(timeout=NO_WORKER_GRACE_S + 3)
            assert fleet_counts(client) == (0, 1)  # still held back all along
            go.touch()
            results = pending.result(timeout=120)

        assert [r.status for r in results] == [ResultStatus.OK] * len(items), \
            worker_logs(tmp_path)
        (live,) = live_workers(client)  # its real beat replaced the starting one
        assert live.pid == proc.pid and not live.starting
    finally:
        go.touch()
        stop_process(proc, grace_s=15)
        log.close()


def test_with_no_worker_at_all_a_submit_still_fails_fast(
        settings: Settings, client: redis.Redis) -> None:
    """Nothing starting, nothing live: NoWorkersError within the producer's grace, well
    before the 10 s the wait was given (a ScoringTimeoutError there would mean it sat the
    timeout out)."""
    assert fleet_counts(client) == (0, 0)
    with RewardClient(settings) as producer:
        pending = producer.submit(make_items(5, "nobody"))
        with pytest.raises(NoWorkersError, match="no rewardq worker is consuming queue"):
            pending.result(timeout=10)
