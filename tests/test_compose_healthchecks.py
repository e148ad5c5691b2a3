"""The healthchecks docker-compose.yml ships, run as written against real processes.

No Docker engine runs here, so ``docker compose`` cannot run them; this runs each service's
``healthcheck.test`` command on the host instead, with only the port its container would
use replaced by the test process's port: healthy while the service works, unhealthy once
it is gone (worker: SIGKILLed, so its heartbeat lapses).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from gateway_harness import running_gateway
from pydantic import SecretStr

from rewardq.broker.embedded import free_port
from rewardq.broker.fleet import BEAT_TTL_S
from rewardq.broker.settings import Settings
from rewardq.flower import FlowerOptions, start_flower
from rewardq.stack import JudgeProcess, settings_env

ROOT = Path(__file__).resolve().parent.parent


def healthcheck(service: str) -> list[str]:
    """The service's ``healthcheck.test`` as an argv (``CMD`` form) with ``python`` this
    interpreter."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test: list[str] = compose["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD", f"{service}: expected the exec form"
    argv = test[1:]
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def run(argv: list[str], env: dict[str, Any] | None = None) -> int:
    """The command's exit status (its stderr, if any, on ours for a failing test's log)."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    if done.returncode:
        print(f"{argv[:2]}... exited {done.returncode}: {done.stderr[-2000:]}")
    return done.returncode


def test_the_flower_healthcheck(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    argv = [a.replace("127.0.0.1:5555", f"127.0.0.1:{port}") for a in healthcheck("flower")]
    assert argv != healthcheck("flower")  # the port really was in it
    options = FlowerOptions(port=port, user="ops", password=SecretStr("s3cret-pass-word"))
    with start_flower(settings, options, log_file=tmp_path / "flower.log"):
        assert run(argv) == 0  # /healthcheck needs none of Flower's basic auth
    assert run(argv) != 0


def test_the_gateway_healthcheck(settings: Settings) -> None:
    with running_gateway(settings) as gateway:
        port = gateway.url.rsplit(":", 1)[1]
        argv = [a.replace("127.0.0.1:8800", f"127.0.0.1:{port}")
                for a in healthcheck("gateway")]
        assert argv != healthcheck("gateway")
        assert run(argv) == 0
    assert run(argv) != 0


def test_the_worker_healthcheck_follows_its_heartbeat(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    argv = healthcheck("worker")
    env = settings_env(settings)
    env.pop("REWARDQ_METRICS_PORT", None)
    assert run(argv, env) != 0  # no worker on this host yet
    [worker] = workers(1)
    assert run(argv, env) == 0
    worker.kill()
    worker.wait(timeout=30)
    deadline = time.monotonic() + BEAT_TTL_S + 10
    while run(argv, env) == 0:
        if time.monotonic() > deadline:
            pytest.fail("the worker healthcheck still passes after its worker was killed")
        time.sleep(1)


def test_every_long_running_service_has_a_healthcheck() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("redis", "worker", "gateway", "flower"):
        assert "healthcheck" in services[name], name
