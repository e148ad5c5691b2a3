"""Worker hooks (``rewardq.workers.hooks``): how they are called, and the shutdown watchdog in a
real worker that Celery stops after an unrecoverable error.

The hooks under test here are fakes of our own ``WorkerHook`` interface; the watchdog
test runs a real ``celery -P gevent`` worker against a real Redis.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT

from rewardq.broker.embedded import EmbeddedRedis
from rewardq.broker.errors import BrokerUnavailableError
from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.stack import settings_env, stop_process, wait_for_workers
from rewardq.workers.hooks import ChunkRun, DroppedMessage, WorkerHook, WorkerHooks

RUN = ChunkRun("job-0", "w0@host", [{"items": [{"id": "a"}]}], received_at=0.0)
RESULTS = [ScoreResult.failure("a", ResultStatus.FAILED, "judge said 400")]


class Recorder(WorkerHook):
    """Records every moment it sees; raises ``failures`` (in turn) at ``failing_at``."""

    def __init__(self, name: str, log: list[str], failing_at: str = "",
                 failures: Sequence[Exception] = ()) -> None:
        self.name = name
        self.log = log
        self.failing_at = failing_at
        self.failures = list(failures)

    def _see(self, moment: str) -> None:
        self.log.append(f"{self.name}.{moment}")
        if moment == self.failing_at and self.failures:
            raise self.failures.pop(0)

    def worker_ready(self, consumer: Any) -> None:
        self._see("worker_ready")

    def worker_stopping(self, exitcode: int) -> None:
        self._see(f"worker_stopping({exitcode})")

    def chunk_done(self, run: ChunkRun, results: Sequence[ScoreResult]) -> None:
        self._see("chunk_done")

    def chunk_failed(self, run: ChunkRun, reason: str, error: BaseException) -> None:
        self._see(f"chunk_failed({reason})")

    def message_dropped(self, message: DroppedMessage) -> None:
        self._see(f"message_dropped({message.reason})")


def test_chunk_done_retries_a_hook_through_a_redis_outage_and_runs_each_hook_once() -> None:
    log: list[str] = []
    blip = [redis.ConnectionError("Connection closed by server."),
            BrokerUnavailableError("rate limiter: Connection closed by server.")]
    hooks = WorkerHooks([Recorder("letters", log, "chunk_done", blip), Recorder("metrics", log)],
                        patience_s=10)

    hooks.chunk_done(RUN, RESULTS)

    assert log == ["letters.chunk_done"] * 3 + ["metrics.chunk_done"]


def test_chunk_done_gives_up_once_the_outage_outlasts_the_patience() -> None:
    log: list[str] = []
    away = [redis.ConnectionError("Connection refused")] * 100
    hooks = WorkerHooks([Recorder("letters", log, "chunk_done", away), Recorder("metrics", log)],
                        patience_s=0.5)

    with pytest.raises(redis.ConnectionError):
        hooks.chunk_done(RUN, RESULTS)
    assert "metrics.chunk_done" not in log  # its results were not all recorded


def test_a_failing_hook_does_not_stop_the_ones_after_it() -> None:
    log: list[str] = []
    hooks = WorkerHooks([Recorder("a", log, "chunk_failed(malformed)", [ValueError("bug")]),
                         Recorder("b", log)], patience_s=1)

    hooks.chunk_failed(RUN, "malformed", ValueError("not a chunk"))

    assert log == ["a.chunk_failed(malformed)", "b.chunk_failed(malformed)"]


@pytest.mark.timeout(120)
def test_a_worker_that_celery_stops_after_an_unrecoverable_error_exits_non_zero(
        settings: Settings, tmp_path: Path) -> None:
    """A consumer error Celery cannot recover from, then a shutdown that hangs (the
    zombie of issue 10): the watchdog ends the process with a failure status."""
    with EmbeddedRedis() as server:  # its own: the test cuts every client's connection
        own = settings.model_copy(update={"redis_url": server.url})
        log_file = tmp_path / "w-unrecoverable.log"
        env = settings_env(own, {"PYTHONPATH": str(ROOT / "tests")})
        cmd = [sys.executable, "-m", "celery", "-A", "unrecoverable_worker", "worker", "-P",
               "gevent", "-c", "4", "-n", "doomed@%h", "--without-mingle", "--loglevel",
               "INFO"]
        with open(log_file, "wb") as out:
            worker = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      cwd=ROOT)
        client = redis.Redis.from_url(server.url)
        try:
            wait_for_workers(own, ["doomed"], processes=[worker])
            # Cut the worker's broker connection: its consumer reconnects, and the test
            # bootstep fails that reconnect for good.
            deadline = time.monotonic() + 30
            while "Unrecoverable error" not in log_file.read_text(errors="replace"):
                assert time.monotonic() < deadline, log_file.read_text(errors="replace")
                client.client_kill_filter(_type="normal", skipme=True)
                time.sleep(0.3)
            failed_at = time.monotonic()
            try:
                status = worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the worker still runs 30 s after its unrecoverable error:\n"
                            + log_file.read_text(errors="replace")[-3000:])
            took = time.monotonic() - failed_at
        finally:
            client.close()
            stop_process(worker, grace_s=1)

    logs = log_file.read_text(errors="replace")
    print(f"\nunrecoverable error -> process gone in {took:.1f}s, status {status}")
    assert status == 1, logs[-3000:]
    assert "worker is stopping (exit status 1)" in logs
