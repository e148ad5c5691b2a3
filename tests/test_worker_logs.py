"""Worker logs are for operators: a WARNING per item that fails for good, none per request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import worker_logs
from scoring_data import make_items

from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess


def run_failing_step(settings: Settings, workers, judge: JudgeProcess, tag: str,
                     **overrides: object) -> int:
    workers(1, judge_max_attempts=1, **overrides)
    judge.configure(error_rate=1.0, error_kinds=["400"], seed=3)  # permanent: no retries
    items = make_items(30, tag)
    with RewardClient(settings) as client:
        results = client.score(items, timeout=60)
    assert {r.status for r in results} == {ResultStatus.FAILED}
    return len(items)


def test_info_log_of_a_failing_run_has_a_warning_per_item_and_no_request_lines(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDQ_TEST_WORKER_LOGLEVEL", "INFO")
    failed = run_failing_step(settings, workers, judge, "logs")
    text = worker_logs(tmp_path)
    warnings = [line for line in text.splitlines()
                if "WARNING" in line and "failed for good" in line]
    assert len(warnings) == failed, text[-3000:]
    assert "HTTP Request:" not in text and "POST http" not in text
    assert "INFO" in text  # the INFO level was really on (Celery's own start-up lines)


def test_json_log_format_writes_one_object_per_line(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDQ_TEST_WORKER_LOGLEVEL", "INFO")
    failed = run_failing_step(settings, workers, judge, "json-logs", log_format="json")
    records = [json.loads(line) for line in worker_logs(tmp_path).splitlines()
               if line.startswith("{")]
    warned = [r for r in records if r["level"] == "WARNING"
              and "failed for good" in r["message"]]
    assert len(warned) == failed
    assert {"time", "level", "logger", "message"} <= set(records[0])
