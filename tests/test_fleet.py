"""The end-to-end path with real parts: producer -> Redis -> gevent workers -> judge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SYSTEM_RABBITMQ, SYSTEM_SERVICES
from kombu import Connection
from scoring_data import expected, make_items

from rewardq.broker.app import QUEUE_JUDGE, create_app
from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess, settings_env


def test_two_workers_score_600_items_exactly_as_the_judge_answers(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    workers(2)
    items = make_items(600, "fleet")
    with RewardClient(settings) as client:
        pending = client.submit(items, step=7)
        results = pending.result(timeout=120)

    assert [r.id for r in results] == [i["id"] for i in items]
    assert {r.status for r in results} == {ResultStatus.OK}
    for item, result in zip(items, results, strict=True):
        assert (result.score, result.raw_score) == expected(item), item["id"]
        assert result.attempts == 1 and not result.cached
        assert result.usage is not None and result.usage.prompt_tokens > 0
    assert judge.stats()["requests_total"] == 600  # one call per distinct pair, no more

    app = create_app(settings)
    per_worker = {name: s["total"].get("rewardq.score_chunk", 0)
                  for name, s in (app.control.inspect(timeout=2).stats() or {}).items()}
    app.close()
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker.values()), per_worker
    assert sum(per_worker.values()) == pending.chunk_count


def test_resubmitting_the_same_items_makes_no_judge_calls(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    workers(1)
    items = make_items(120, "again")
    with RewardClient(settings) as client:
        first = client.score(items, timeout=60)
        calls = judge.stats()["requests_total"]
        again = client.submit(items)
        second = again.result(timeout=10)
        renamed = client.score([{**i, "id": i["id"] + "-renamed"} for i in items],
                               timeout=10)

    assert calls == 120
    assert again.chunk_count == 0 and again.cache_hits_at_submit == 120
    assert judge.stats()["requests_total"] == calls
    assert [r.score for r in second] == [r.score for r in first]
    assert all(r.cached for r in second) and all(r.cached for r in renamed)
    assert [r.id for r in renamed] == [i["id"] + "-renamed" for i in items]


def test_one_worker_process_holds_200_judge_calls_in_flight(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    judge.configure(latency_ms=1500)
    workers(1, max_concurrent_requests=256, worker_concurrency=64, chunk_size=8)
    with RewardClient(settings.model_copy(update={"chunk_size": 8})) as client:
        results = client.score(make_items(300, "inflight"), timeout=120)

    assert all(r.status is ResultStatus.OK for r in results)
    # 300 calls of 1.5 s each through one process: only an overlapping bridge gets here.
    assert judge.stats()["max_in_flight"] >= 200


def test_submit_command_writes_one_result_line_per_item_in_order(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path) -> None:
    workers(1)
    items = make_items(40, "cli")
    items.append(dict(items[0], id="cli-duplicate"))  # same pair, another id
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "results.jsonl"

    done = subprocess.run([sys.executable, "-m", "rewardq.cli", "submit", str(src), "--out",
                           str(out), "--timeout", "60"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [i["id"] for i in items]
    assert all(r["status"] == "ok" for r in lines)
    assert [r["score"] for r in lines] == [expected(i)[0] for i in items]
    assert "scored 41 items" in done.stderr


@pytest.mark.skipif(not SYSTEM_SERVICES, reason="REWARDQ_TEST_SYSTEM_SERVICES=1 asks for it")
def test_rabbitmq_can_be_the_celery_broker(settings: Settings, workers,
                                           judge: JudgeProcess) -> None:
    with Connection(SYSTEM_RABBITMQ) as conn:  # start from an empty queue
        conn.SimpleQueue(QUEUE_JUDGE).queue.purge()  # type: ignore[no-untyped-call]
    rabbit = settings.model_copy(update={"celery_broker_url": SYSTEM_RABBITMQ})
    workers(1, celery_broker_url=SYSTEM_RABBITMQ)
    items = make_items(50, "rabbit")
    with RewardClient(rabbit) as client:
        results = client.score(items, timeout=60)
    assert [r.score for r in results] == [expected(i)[0] for i in items]
    assert judge.stats()["requests_total"] == 50
