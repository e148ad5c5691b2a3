"""Starting and stopping the local stack: embedded Redis, the local judge, workers.

``rewardq demo``, ``rewardq bench`` and the test fixtures all run the real parts as
separate processes, exactly as a deployment does, and stop every one of them on exit
(Ctrl-C included): SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from celery.utils.nodenames import default_nodename
from pydantic import SecretStr

from rewardq.broker.app import QUEUE_JUDGE, create_app
from rewardq.broker.embedded import EmbeddedRedis
from rewardq.broker.errors import RewardqError
from rewardq.broker.settings import Settings

_LISTENING = re.compile(r"listening on (http://\S+)")


def stop_process(process: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM ``process``, then SIGKILL it if it is still alive after ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def settings_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a child process needs to rebuild ``settings`` (``REWARDQ_*``)."""
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude={"judge_api_key"}).items():
        key = f"REWARDQ_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, SecretStr):
            env[key] = value.get_secret_value()
        elif isinstance(value, dict | list | tuple):
            env[key] = json.dumps(value)  # pydantic-settings parses complex fields as JSON
        else:
            env[key] = str(value)
    env["OPENAI_API_KEY"] = settings.judge_api_key.get_secret_value()
    env.update(extra or {})
    return env


@dataclass
class JudgeProcess:
    """A local judge server running as a child process."""

    process: subprocess.Popen[str]
    base_url: str
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    @property
    def root(self) -> str:
        """The server's root URL (``base_url`` without ``/v1``)."""
        return self.base_url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        """``GET /stats``."""
        data: dict[str, Any] = self._http.get(f"{self.root}/stats").json()
        return data

    def requests(self) -> list[dict[str, str]]:
        """``GET /requests``: the latest requests (model, title, user message)."""
        data: list[dict[str, str]] = self._http.get(f"{self.root}/requests").json()
        return data

    def reset_stats(self) -> None:
        """``POST /stats/reset``."""
        self._http.post(f"{self.root}/stats/reset").raise_for_status()

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """``POST /admin/config`` with any of latency_ms, error_rate, rpm_limit, ..."""
        response = self._http.post(f"{self.root}/admin/config", json=knobs)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def stop(self) -> None:
        """Stop the server process."""
        self._http.close()
        stop_process(self.process, grace_s=5)


def start_judge(port: int = 0, *, latency_ms: float = 0, jitter_ms: float = 0,
                error_rate: float = 0, rpm_limit: int = 0, seed: int = 0,
                timeout_s: float = 20) -> JudgeProcess:
    """Start ``python -m rewardq.judge_server`` and wait until it listens.

    Raises:
        RewardqError: the server exited or did not report its address in time.
    """
    cmd = [sys.executable, "-m", "rewardq.judge_server", "--port", str(port),
           "--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms),
           "--error-rate", str(error_rate), "--rpm-limit", str(rpm_limit), "--seed", str(seed)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = _LISTENING.search(line)
        if match:
            return JudgeProcess(process, match.group(1))
        if not line and process.poll() is not None:
            break
    stop_process(process)
    raise RewardqError("the local judge server did not start")


def start_worker(settings: Settings, *, name: str, concurrency: int | None = None,
                 log_file: Path | None = None, loglevel: str = "WARNING",
                 extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start one gevent-pooled Celery worker process for ``settings``."""
    cmd = [sys.executable, "-m", "celery", "-A", "rewardq.workers.main", "worker", "-P", "gevent",
           "-c", str(concurrency or settings.worker_concurrency), "-Q", QUEUE_JUDGE,
           "-n", f"{name}@%h", "--loglevel", loglevel, "--without-mingle"]
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(cmd, env=settings_env(settings, extra_env), stdout=out,
                            stderr=subprocess.STDOUT)


def wait_for_workers(settings: Settings, names: list[str], timeout_s: float = 60,
                     processes: list[subprocess.Popen[bytes]] | None = None) -> None:
    """Block until every named worker answers a broadcast ping.

    Raises:
        RewardqError: a worker exited, or not all answered within ``timeout_s``.
    """
    app = create_app(settings)
    wanted = set(names)
    # Asked by full node name (start_worker names them ``name@%h``), a ping returns as
    # soon as each has answered instead of always waiting out its timeout.
    nodes = [f"{name}@{default_nodename(None).split('@', 1)[1]}" for name in names]
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            replies = app.control.ping(destination=nodes, limit=len(nodes), timeout=0.25) or []
            seen = {host.split("@")[0] for reply in replies for host in reply}
            if wanted <= seen:
                return
            for p in processes or []:
                if p.poll() is not None:
                    raise RewardqError(f"a worker exited with status {p.returncode}")
        raise RewardqError(f"workers {sorted(wanted)} not ready after {timeout_s}s")
    finally:
        app.close()


class LocalStack:
    """Embedded Redis (unless ``redis_url``), the local judge (unless ``judge_base_url``)
    and ``workers`` worker processes; a context manager that stops them all.

    Args:
        settings: the base settings; the stack's Redis and judge URLs replace theirs.
        workers: how many worker processes to start.
        judge_latency_ms: latency of the local judge.
        log_dir: where worker logs go (``None``: discarded).
    """

    def __init__(self, settings: Settings, *, workers: int = 2, judge_latency_ms: float = 0,
                 judge_jitter_ms: float = 0, log_dir: Path | None = None) -> None:
        self._base = settings
        self._workers_wanted = workers
        self._latency_ms = judge_latency_ms
        self._jitter_ms = judge_jitter_ms
        self._log_dir = log_dir
        self._stack = contextlib.ExitStack()
        self.redis: EmbeddedRedis | None = None
        self.judge: JudgeProcess | None = None
        self.worker_processes: list[subprocess.Popen[bytes]] = []
        self.settings = settings

    def __enter__(self) -> LocalStack:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        overrides: dict[str, Any] = {}
        if self._base.redis_url is None:
            self.redis = self._stack.enter_context(EmbeddedRedis())
            overrides["redis_url"] = self.redis.url
        if self._base.judge_base_url == Settings.model_fields["judge_base_url"].default:
            self.judge = start_judge(latency_ms=self._latency_ms, jitter_ms=self._jitter_ms)
            self._stack.callback(self.judge.stop)
            overrides["judge_base_url"] = self.judge.base_url
        self.settings = self._base.model_copy(update=overrides)
        self._stack.callback(self._stop_workers)
        self.add_workers(self._workers_wanted)

    def add_workers(self, count: int, **overrides: Any) -> list[subprocess.Popen[bytes]]:
        """Start ``count`` more worker processes (settings ``overrides`` apply to them)."""
        settings = self.settings.model_copy(update=overrides)
        first = len(self.worker_processes)
        names = [f"rewardq-w{first + i}" for i in range(count)]
        started = [start_worker(settings, name=n, log_file=self._log_file(n)) for n in names]
        self.worker_processes.extend(started)
        wait_for_workers(settings, names, processes=started)
        return started

    def _log_file(self, name: str) -> Path | None:
        if self._log_dir is None:
            return None
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return self._log_dir / f"{name}.log"

    def _stop_workers(self) -> None:
        for p in self.worker_processes:
            if p.poll() is None:
                p.terminate()
        for p in self.worker_processes:
            stop_process(p, grace_s=15)

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

