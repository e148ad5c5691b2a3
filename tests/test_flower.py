"""Flower: a real Flower process on the fleet's broker, its HTTP API, auth and refusals."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import SecretStr
from scoring_data import make_items

from rewardq.broker.embedded import free_port
from rewardq.broker.errors import ConfigError
from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.flower import FlowerOptions, flower_command, is_loopback, run_flower, start_flower
from rewardq.ops_cli import add_ops_parsers
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess

T = TypeVar("T")
USER, PASSWORD = "ops", "flower-test-password"


def poll(probe: Callable[[], T | None], timeout_s: float = 30.0, what: str = "") -> T:
    """``probe()``'s first truthy answer, asked every 0.2 s for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what or probe}")
        time.sleep(0.2)


def test_flower_shows_the_running_workers_and_the_tasks_they_finished(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path) -> None:
    workers(2)
    db = tmp_path / "flower-state"
    options = FlowerOptions(port=free_port(), user=USER, password=SecretStr(PASSWORD),
                            persistent=True, db=db)
    with start_flower(settings, options, log_file=tmp_path / "flower.log") as flower:
        # Flower marks a worker online once its event stream delivers that worker's
        # heartbeat: from then on it sees every task event.
        poll(lambda: flower.get("/metrics").text.count("flower_worker_online{") >= 2,
             what="both workers online in Flower")
        with RewardClient(settings.model_copy(update={"chunk_size": 16})) as client:
            pending = client.submit(make_items(64, "flower"), step=1)
            assert all(r.status is ResultStatus.OK for r in pending.result(timeout=60))
        chunk_ids = {f"{pending.job_id}-{n}" for n in range(pending.chunk_count)}

        listed = flower.api("/api/workers", refresh="1")
        assert sorted(name.split("@")[0] for name in listed) == ["w0", "w1"]

        def finished() -> dict[str, Any] | None:
            tasks = flower.api("/api/tasks")
            done = {i: t for i, t in tasks.items() if i in chunk_ids and t["state"] == "SUCCESS"}
            return done if len(done) == len(chunk_ids) else None

        tasks = poll(finished, what="every chunk task SUCCESS in /api/tasks")
        assert {t["name"] for t in tasks.values()} == {"rewardq.score_chunk"}
        assert {t["worker"] for t in tasks.values()} <= set(listed)
        # A chunk's state is SUCCESS whatever became of its items: its result starts with
        # the items per status, which Flower shows.
        assert all(t["result"].startswith("{'outcome': {'ok': 16}") for t in tasks.values())
        judge.configure(error_rate=1.0, error_kinds=["400"])
        with RewardClient(settings.model_copy(update={"chunk_size": 16})) as client:
            failing = client.submit(make_items(16, "flower-400"), step=2)
            assert {r.status for r in failing.result(timeout=60)} == {ResultStatus.FAILED}
        failed_chunk = f"{failing.job_id}-0"
        shown = poll(lambda: flower.api("/api/tasks").get(failed_chunk, {}).get("result"),
                     what="the failing chunk's result in /api/tasks")
        assert shown.startswith("{'outcome': {'failed': 16}"), shown

        # The API and the pages need the credentials; /metrics and /healthcheck do not.
        assert flower.get("/api/workers").status_code == 200
        flower.auth = None
        assert flower.get("/api/workers").status_code == 401
        assert flower.get("/workers").status_code == 401
        assert 'type="task-succeeded"' in flower.get("/metrics").text

    # Persistent: a new Flower on the same state file knows the finished tasks at once.
    assert list(tmp_path.glob("flower-state*"))
    with start_flower(settings, options, log_file=tmp_path / "flower2.log") as again:
        remembered = again.api("/api/tasks")
        assert chunk_ids <= set(remembered)


@pytest.mark.parametrize("address", ["0.0.0.0", "", "::", "10.1.2.3", "rewardq.example.com"])
def test_flower_refuses_to_listen_beyond_loopback_without_auth(
        settings: Settings, address: str) -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        FlowerOptions(port=5555, address=address).validate()
    with pytest.raises(ConfigError, match="without authentication"):
        run_flower(settings, free_port(), address)  # raises before it would exec

    parser = argparse.ArgumentParser()
    add_ops_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["flower", "--address", address or "0.0.0.0"])
    with pytest.raises(ConfigError, match="without authentication"):
        args.func(args, settings)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_flower_may_listen_on_loopback_without_auth(address: str) -> None:
    assert is_loopback(address)
    FlowerOptions(address=address).validate()


def test_flower_needs_both_user_and_password_and_keeps_them_off_its_command_line(
        settings: Settings) -> None:
    with pytest.raises(ConfigError, match="both a user and a password"):
        FlowerOptions(user="ops").validate()
    with pytest.raises(ConfigError, match="both a user and a password"):
        FlowerOptions(password=SecretStr("pw")).validate()

    keyed = settings.model_copy(update={"judge_api_key": SecretStr("sk-never-in-flower")})
    options = FlowerOptions(address="0.0.0.0", user=USER, password=SecretStr(PASSWORD))
    argv, env = flower_command(keyed, options)
    assert not any(PASSWORD in arg for arg in argv)
    assert env["FLOWER_BASIC_AUTH"] == f"{USER}:{PASSWORD}"
    assert "--address=0.0.0.0" in argv
    assert "sk-never-in-flower" not in " ".join([*argv, *env.values()])
    assert "FLOWER_UNAUTHENTICATED_API" not in env
