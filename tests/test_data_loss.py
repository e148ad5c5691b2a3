"""Redis restarted *without* its data mid-run: the producer notices and sends again.

Queued chunks, kombu's unacked records and stored results all vanish with an empty
restart (no persistence, or a failover to a replica that missed writes). The producer
knows what it sent; a chunk that Redis no longer knows for a few seconds is sent again
(verdicts already cached are reused) with a warning, or, when re-enqueueing is off, the
wait fails with ``ChunksLostError`` naming data loss.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import worker_logs
from scoring_data import expected, make_items

from rewardq.broker.embedded import EmbeddedRedis, free_port
from rewardq.broker.errors import ChunksLostError
from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess


def wait_for_calls(judge: JudgeProcess, at_least: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while judge.stats()["requests_total"] < at_least:
        assert time.monotonic() < deadline, "the judge never got the calls"
        time.sleep(0.05)


def restart_empty(server: EmbeddedRedis, port: int) -> EmbeddedRedis:
    server.stop()
    time.sleep(0.5)
    return EmbeddedRedis(port=port).start()


@pytest.mark.timeout(240)
def test_chunks_lost_with_redis_data_are_sent_again_and_result_returns(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    server = EmbeddedRedis(port=port).start()
    try:
        judge.configure(latency_ms=200)
        workers(2, redis_url=server.url, worker_concurrency=2, max_concurrent_requests=16,
                chunk_lease_s=5.0, inflight_lock_ttl_s=5.0)
        own = settings.model_copy(update={"redis_url": server.url})
        items = make_items(512, "lost")  # 8 chunks; 4 run at once, 4 wait in the queue
        with RewardClient(own) as client, ThreadPoolExecutor(1) as waiter, \
                caplog.at_level(logging.WARNING, logger="rewardq.producer.client"):
            pending = client.submit(items)
            wait_for_calls(judge, 40)
            server = restart_empty(server, port)
            results = waiter.submit(pending.result).result(timeout=200)  # no timeout
        bad = [r for r in results if r.status is not ResultStatus.OK]
        assert not bad, f"{len(bad)} not ok: {bad[:2]}\n{worker_logs(tmp_path)[-3000:]}"
        assert [r.score for r in results] == [expected(i)[0] for i in items]
        assert pending.resent_chunks >= 1
        assert "Redis lost" in caplog.text and "sent them again" in caplog.text
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_with_reenqueueing_off_the_wait_names_data_loss_within_its_timeout(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    port = free_port()
    server = EmbeddedRedis(port=port).start()
    try:
        judge.configure(latency_ms=200)
        workers(1, redis_url=server.url, worker_concurrency=1, max_concurrent_requests=8)
        own = settings.model_copy(update={"redis_url": server.url,
                                          "reenqueue_lost_chunks": False})
        with RewardClient(own) as client:
            pending = client.submit(make_items(256, "lost-off"))
            wait_for_calls(judge, 8)
            server = restart_empty(server, port)
            with pytest.raises(ChunksLostError, match="data loss"):
                pending.result(timeout=120)
    finally:
        server.stop()
