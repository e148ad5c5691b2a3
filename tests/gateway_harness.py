"""``rewardq serve`` as a real child process, for the gateway tests and benchmark."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from rewardq.broker.errors import RewardqError
from rewardq.broker.settings import Settings
from rewardq.stack import settings_env, stop_process

_LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass
class GatewayProcess:
    """A running ``rewardq serve`` and its root URL (``http://127.0.0.1:PORT``)."""

    process: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        """SIGTERM it (uvicorn shuts down gracefully), SIGKILL after a grace period."""
        stop_process(self.process, grace_s=10)


def start_gateway(settings: Settings, *, extra_env: Mapping[str, str] | None = None,
                  host: str = "127.0.0.1", timeout_s: float = 30) -> GatewayProcess:
    """Start ``python -m rewardq.cli serve --port 0`` with ``settings`` in its environment
    and wait for its ``listening on`` line.

    Raises:
        RewardqError: it exited or did not report its address in time.
    """
    cmd = [sys.executable, "-m", "rewardq.cli", "serve", "--host", host, "--port", "0",
           "--log-level", "warning"]
    process = subprocess.Popen(cmd, env=settings_env(settings, extra_env),
                               stdout=subprocess.PIPE, stderr=None, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = _LISTENING.search(line)
        if match:
            return GatewayProcess(process, match.group(1))
        if not line and process.poll() is not None:
            break
    stop_process(process)
    raise RewardqError(f"rewardq serve did not start (exit status {process.poll()})")


@contextmanager
def running_gateway(settings: Settings, **kwargs: object) -> Iterator[GatewayProcess]:
    """:func:`start_gateway` as a context manager that stops it."""
    gateway = start_gateway(settings, **kwargs)  # type: ignore[arg-type]
    try:
        yield gateway
    finally:
        gateway.stop()
