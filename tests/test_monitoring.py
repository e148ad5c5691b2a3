"""Worker metrics, their HTTP endpoint, and ``rewardq stats``: in-process and on a real fleet."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from scoring_data import make_items
from worker_endpoints import worker_endpoints

from rewardq.broker.errors import (
    JudgeError,
    PermanentJudgeError,
    TransientJudgeError,
    UnparseableReplyError,
)
from rewardq.broker.schemas import ResultStatus
from rewardq.broker.settings import Settings
from rewardq.judge.verdicts import classify
from rewardq.monitoring.metrics import (
    METRICS_PORT_SPAN,
    WorkerMetrics,
    call_status,
    start_metrics_server,
)
from rewardq.ops_cli import add_ops_parsers
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess
from rewardq.stats_view import FleetMetrics, StatsSnapshot, WorkerRow, render, run_stats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(found: Iterable[Samples], name: str, **labels: str) -> float:
    """Sum of ``name`` over expositions, for samples carrying ``labels``."""
    return sum(value for s in found for (n, lbls), value in s.items()
               if n == name and labels.items() <= dict(lbls).items())


def scrape(metrics: WorkerMetrics) -> Samples:
    from prometheus_client import generate_latest

    return samples(generate_latest(metrics.registry).decode())


def test_each_recording_method_shows_up_under_its_rewardq_name() -> None:
    m = WorkerMetrics()
    m.judge_call("judge-a", "ok", 0.03)
    m.judge_call("judge-a", "ok", 0.7)
    m.judge_call("judge-a", "429", 0.001)
    m.judge_call("judge-b", "ok", 500.0)
    m.cache_lookup(hits=3, misses=5)
    m.dedup_wait()
    m.rate_limited(0.25)
    m.rate_limited(0.5)
    m.rate_limited(0.0)  # admitted at once: not a wait
    m.retry("429")
    m.dead_letter("item")
    m.usage("judge-a", 100, 7, 0.0012)
    m.usage("judge-a", 50, 3, 0.0006)
    m.chunk("ok", ["ok", "ok", "failed"])
    s = scrape(m)

    assert s[("rewardq_judge_requests_total", (("model", "judge-a"), ("status", "ok")))] == 2
    assert s[("rewardq_judge_requests_total", (("model", "judge-a"), ("status", "429")))] == 1
    bucket = "rewardq_judge_latency_seconds_bucket"
    assert s[(bucket, (("le", "0.025"), ("model", "judge-a")))] == 1  # 0.001
    assert s[(bucket, (("le", "0.05"), ("model", "judge-a")))] == 2  # + 0.03
    assert s[(bucket, (("le", "1.0"), ("model", "judge-a")))] == 3  # + 0.7
    assert s[(bucket, (("le", "120.0"), ("model", "judge-b")))] == 0
    assert s[(bucket, (("le", "+Inf"), ("model", "judge-b")))] == 1
    assert s[("rewardq_judge_latency_seconds_count", (("model", "judge-a"),))] == 3
    assert s[("rewardq_judge_latency_seconds_sum", (("model", "judge-a"),))] == \
        pytest.approx(0.731)
    assert s[("rewardq_cache_hits_total", ())] == 3
    assert s[("rewardq_cache_misses_total", ())] == 5
    assert s[("rewardq_dedup_waits_total", ())] == 1
    assert s[("rewardq_rate_limit_waits_total", ())] == 2
    assert s[("rewardq_rate_limit_wait_seconds_total", ())] == 0.75
    assert s[("rewardq_retries_total", (("reason", "429"),))] == 1
    assert s[("rewardq_dead_letters_total", (("kind", "item"),))] == 1
    assert s[("rewardq_judge_prompt_tokens_total", (("model", "judge-a"),))] == 150
    assert s[("rewardq_judge_completion_tokens_total", (("model", "judge-a"),))] == 10
    assert s[("rewardq_judge_cost_usd_total", (("model", "judge-a"),))] == pytest.approx(0.0018)
    assert s[("rewardq_chunks_total", (("status", "ok"),))] == 1
    assert s[("rewardq_items_total", (("status", "ok"),))] == 2
    assert s[("rewardq_items_total", (("status", "failed"),))] == 1
    assert all(name.startswith("rewardq_") for name, _ in s)


def test_two_instances_have_separate_registries() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.dedup_wait()
    assert scrape(a)[("rewardq_dedup_waits_total", ())] == 1
    assert scrape(b)[("rewardq_dedup_waits_total", ())] == 0


def test_updates_from_many_native_threads_are_all_counted() -> None:
    m = WorkerMetrics()
    per_thread = 20_000

    def hammer() -> None:
        for _ in range(per_thread):
            m.judge_call("judge", "ok", 0.01)
            m.cache_lookup(1, 0)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = scrape(m)
    assert s[("rewardq_judge_requests_total", (("model", "judge"), ("status", "ok")))] == \
        4 * per_thread
    assert s[("rewardq_judge_latency_seconds_count", (("model", "judge"),))] == 4 * per_thread
    assert s[("rewardq_cache_hits_total", ())] == 4 * per_thread


def _request() -> httpx.Request:
    return httpx.Request("POST", "http://judge.invalid/v1/chat/completions")


@pytest.mark.parametrize(("error", "status"), [
    (None, "ok"),
    (UnparseableReplyError("no score"), "unparseable"),
    (TransientJudgeError("judge answered HTTP 429", status_code=429), "429"),
    (PermanentJudgeError("judge answered HTTP 401", status_code=401), "401"),
    (classify(openai.APIStatusError("boom", response=httpx.Response(503, request=_request()),
                                    body=None)), "503"),
    (classify(openai.APITimeoutError(_request())), "timeout"),
    (classify(openai.APIConnectionError(request=_request())), "network"),
    (PermanentJudgeError("judge error: odd"), "other"),
])
def test_call_status_gives_few_label_values(error: JudgeError | None, status: str) -> None:
    """The label comes from the error's HTTP status, else its kind: never from the text
    or the class name of an exception."""
    assert call_status(error) == status


def test_endpoint_serves_over_http_on_a_free_port_or_the_next_one_in_range() -> None:
    m = WorkerMetrics()
    m.chunk("ok", ["ok"])
    port = start_metrics_server(0, m.registry, addr="127.0.0.1")
    body = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert samples(body)[("rewardq_chunks_total", (("status", "ok"),))] == 1

    # A second process asking for the same port gets the next free one of the range.
    taken = start_metrics_server(0, WorkerMetrics().registry, addr="127.0.0.1")
    other = start_metrics_server(taken, m.registry, addr="127.0.0.1")
    assert taken < other < taken + METRICS_PORT_SPAN
    assert "rewardq_chunks_total" in httpx.get(f"http://127.0.0.1:{other}/metrics").text

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        with pytest.raises(OSError, match="no free metrics port"):
            start_metrics_server(blocker.getsockname()[1], m.registry, addr="127.0.0.1",
                                 span=1)


def _snapshot(at: float, chunks: int, items_ok: float, calls: float) -> StatsSnapshot:
    metrics = FleetMetrics(judge_requests=calls, judge_errors=2, cache_hits=1, cache_misses=3,
                           items={"ok": items_ok, "failed": 1}, cost_usd=0.5)
    return StatsSnapshot(taken_at=at, queue_depth=7, in_progress=2, dead_letters=1,
                         workers=[WorkerRow("w0@host", 12, 64, chunks, 2, None)],
                         metrics=metrics)


def test_stats_render_shows_rates_between_two_snapshots() -> None:
    before = _snapshot(1000.0, chunks=10, items_ok=99, calls=100)
    after = _snapshot(1002.0, chunks=14, items_ok=159, calls=140)
    text = render(after, before)
    assert "queue depth              7" in text
    assert "chunks done 14 (2.0/s)" in text
    assert "(30.0/s)" in text  # items: (160 - 100) / 2 s
    assert "(20.0/s)" in text  # judge calls
    assert "25.0%" in text  # cache hit rate
    assert "0.5000 USD" in text
    assert "w0@host" in text
    assert "(-)" in render(after)  # no rates from a single snapshot


def test_stats_once_reports_the_backlog_of_a_fleet_without_workers(settings: Settings) -> None:
    settings = settings.model_copy(update={"chunk_size": 16})
    with RewardClient(settings) as client:
        pending = client.submit(make_items(40, "backlog"))
    assert pending.chunk_count == 3

    out = io.StringIO()
    assert run_stats(settings, once=True, as_json=True, out=out, timeout_s=0.5) == 0
    snap = json.loads(out.getvalue())
    assert snap["queue_depth"] == 3
    assert snap["workers"] == [] and snap["metrics"] is None


def test_rewardq_stats_once_lists_the_workers_and_the_chunks_they_did(
        settings: Settings, workers, judge: JudgeProcess,
        capsys: pytest.CaptureFixture[str]) -> None:
    workers(2)
    with RewardClient(settings) as client:
        pending = client.submit(make_items(80, "stats"))
        assert all(r.status is ResultStatus.OK for r in pending.result(timeout=60))

    parser = argparse.ArgumentParser()
    add_ops_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["stats", "--once", "--json"])
    assert args.func(args, settings) == 0
    snap = json.loads(capsys.readouterr().out)
    assert sorted(w["node"].split("@")[0] for w in snap["workers"]) == ["w0", "w1"]
    assert snap["chunks_processed"] == pending.chunk_count
    assert snap["queue_depth"] == 0 and snap["in_progress"] == 0

    args = parser.parse_args(["stats", "--once"])
    assert args.func(args, settings) == 0
    text = capsys.readouterr().out
    assert "queue depth              0" in text and "w0@" in text and "w1@" in text


def test_worker_endpoints_count_exactly_what_the_run_did(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """Scrape every worker after a run with injected faults and duplicates."""
    workers(2, metrics_port=0)
    endpoints = worker_endpoints(settings)
    assert len(endpoints) == 2

    judge.configure(error_rate=0.25, error_kinds=["500", "429"])
    items = make_items(90, "metrics")
    duplicates = [dict(item, id=f"{item['id']}-again") for item in items[:10]]
    with RewardClient(settings) as client:
        pending = client.submit(items + duplicates)
        results = pending.result(timeout=120)
    stats = judge.stats()
    found = [samples(httpx.get(e.url_for("127.0.0.1")).text) for e in endpoints.values()]

    calls = stats["requests_total"]
    assert total(found, "rewardq_judge_requests_total") == calls
    assert total(found, "rewardq_judge_latency_seconds_count") == calls
    for status, count in stats["responses_by_status"].items():
        label = "ok" if status == "200" else status
        assert total(found, "rewardq_judge_requests_total", status=label) == count, status
    assert total(found, "rewardq_judge_prompt_tokens_total") == stats["prompt_tokens_total"]
    assert total(found, "rewardq_judge_completion_tokens_total") == \
        stats["completion_tokens_total"]
    assert total(found, "rewardq_retries_total") == \
        sum(max(0, r.attempts - 1) for r in results) > 0
    assert total(found, "rewardq_chunks_total", status="ok") == pending.chunk_count
    by_status: dict[str, int] = {}
    for r in results:
        by_status[r.status.value] = by_status.get(r.status.value, 0) + 1
    for status, count in by_status.items():
        assert total(found, "rewardq_items_total", status=status) == count
    assert total(found, "rewardq_dead_letters_total") == by_status.get("failed", 0)
    # Every distinct pair was claimed once as a miss; each duplicate found the verdict
    # cached, or waited for the call in flight (in this process or another).
    assert 90 <= total(found, "rewardq_cache_misses_total") <= 100
    assert total(found, "rewardq_cache_hits_total") \
        + total(found, "rewardq_dedup_waits_total") >= 10


# -- deployment files -------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
COMPOSE_ENV = {"REDIS_PASSWORD": "compose-test-redis", "FLOWER_PASSWORD": "compose-test-flower",
               "GRAFANA_PASSWORD": "compose-test-grafana"}


def _exposed_names(redis_url: str) -> set[str]:
    """Every sample name a worker exposes once each family has a value (the fleet-wide
    series read from a real Redis)."""
    from rewardq.monitoring.metrics import FleetCollector

    m = WorkerMetrics()
    m.registry.register(FleetCollector(redis.Redis.from_url(redis_url)))
    m.judge_call("m", "ok", 0.1)
    m.usage("m", 1, 1, 0.1)
    m.retry("429")
    m.dead_letter("item")
    m.chunk("ok", ["ok"])
    return {name for name, _ in scrape(m)}


def _flower_names() -> set[str]:
    import flower.events

    source = Path(flower.events.__file__).read_text()
    names = set(re.findall(r"['\"](flower_[a-z_]+)['\"]", source))
    return names | {f"{n}_{suffix}" for n in names for suffix in ("bucket", "sum", "count")}


def _metric_names(expr: str, prefix: str) -> set[str]:
    return set(re.findall(rf"\b({prefix}_[a-z_]+)", expr))


def _dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana" / "rewardq-dashboard.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def _alert_rules() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_dashboard_and_alerts_only_use_metrics_that_exist(redis_url: str) -> None:
    ours, flowers = _exposed_names(redis_url), _flower_names()
    exprs = _dashboard_exprs() + [rule["expr"] for rule in _alert_rules()]
    used = set().union(*(_metric_names(e, "rewardq") for e in exprs))
    assert used and used <= ours, used - ours
    used_flower = set().union(*(_metric_names(e, "flower") for e in exprs))
    assert used_flower and used_flower <= flowers, used_flower - flowers


def test_alert_rules_cover_worker_down_failure_ratio_and_queue_backlog() -> None:
    rules = {rule["alert"]: rule for rule in _alert_rules()}
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
    assert 'up{job="rewardq-worker"} == 0' in rules["RewardqWorkerDown"]["expr"]
    assert "rewardq_judge_requests_total" in rules["RewardqJudgeFailureRatioHigh"]["expr"]
    assert 'redis_key_size{key="rewardq.judge"}' in rules["RewardqQueueBacklog"]["expr"]
    yaml = pytest.importorskip("yaml")
    scrape_jobs = {job["job_name"]: job for job in
                   yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]}
    assert scrape_jobs["rewardq-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert scrape_jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


def _compose_cli() -> list[str]:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return cmd
    pytest.skip("no docker compose (plugin or docker-compose) on PATH")


def test_docker_compose_config_passes_and_describes_the_stack() -> None:
    cmd = _compose_cli()
    env = {**os.environ, **COMPOSE_ENV}
    done = subprocess.run([*cmd, "--profile", "local-judge", "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load(done.stdout)["services"]
    assert {"redis", "worker", "flower", "prometheus", "grafana", "judge"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    for flag in ("--requirepass", "--appendonly yes", "--maxmemory-policy noeviction"):
        assert flag in redis_cmd
    worker = services["worker"]
    assert "ports" not in worker and "container_name" not in worker  # --scale worker=N
    assert worker["environment"]["REWARDQ_METRICS_PORT"] == "9808"
    assert "compose-test-redis" in worker["environment"]["REWARDQ_REDIS_URL"]
    assert services["judge"]["profiles"] == ["local-judge"]
    assert "--address" in services["flower"]["command"]
    assert "OPENAI_API_KEY" not in services["flower"]["environment"]

    no_password = {k: v for k, v in env.items() if k != "REDIS_PASSWORD"}
    refused = subprocess.run([*cmd, "config"], cwd=ROOT, env=no_password,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr
