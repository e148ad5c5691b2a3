"""``rewardq stats`` tells operators the truth: cache hits at submit, dead workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from scoring_data import make_items

from rewardq.broker.settings import Settings
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess, settings_env


def stats_once(settings: Settings) -> dict:
    done = subprocess.run([sys.executable, "-m", "rewardq.cli", "stats", "--once", "--json"],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_cache_hits_at_submit_are_counted_for_operators(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    workers(1, metrics_port=0)
    items = make_items(60, "hits")
    with RewardClient(settings) as client:
        client.score(items, timeout=60)
        again = client.submit(items[:45])
        again.result(timeout=60)
    assert again.cache_hits_at_submit == 45
    snapshot = stats_once(settings)
    assert snapshot["submit_cache_hits"] == 45
    metrics = snapshot["metrics"]
    assert metrics is not None and metrics["submit_cache_hits"] == 45
    # 45 answered at submit out of 105 looked up (60 + 45); the workers' own lookups
    # found nothing cached.
    assert abs(metrics["cache_hit_rate"] - 45 / 105) < 1e-9, metrics


def test_a_sigkilled_worker_is_reported_down_then_gone(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    first, second = workers(2)
    before = stats_once(settings)
    assert before["workers_up"] == 2
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    deadline = time.monotonic() + 30
    while True:
        snapshot = stats_once(settings)
        if snapshot["workers_up"] == 1:
            break
        assert time.monotonic() < deadline, snapshot["workers"]
        time.sleep(0.5)
    assert second.poll() is None
    up = [w["node"] for w in snapshot["workers"] if w["up"]]
    assert len(up) == 1 and up[0].startswith("w1@")


def test_stats_once_prints_no_interactive_hint(settings: Settings, judge: JudgeProcess) -> None:
    done = subprocess.run([sys.executable, "-m", "rewardq.cli", "stats", "--once"],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "rewardq stats" in done.stdout and "Ctrl-C" not in done.stdout


def test_the_fleet_liveness_metric_drops_when_a_worker_is_killed(
        settings: Settings, workers, judge: JudgeProcess) -> None:
    """A dead process cannot report itself: every worker's endpoint also serves the
    fleet's live-worker count from Redis heartbeats, which a SIGKILL ends."""
    import httpx

    from rewardq.broker.app import create_app
    from rewardq.monitoring.metrics import discover_endpoints

    first, second = workers(2, metrics_port=0)
    app = create_app(settings)
    try:
        endpoints = discover_endpoints(app, timeout_s=2)
    finally:
        app.close()
    assert len(endpoints) == 2

    def workers_up(url: str) -> float:
        for line in httpx.get(url, timeout=5).text.splitlines():
            if line.startswith("rewardq_fleet_workers_up "):
                return float(line.split()[1])
        raise AssertionError("no rewardq_fleet_workers_up sample")

    survivor = next(e.url_for("127.0.0.1") for node, e in endpoints.items()
                    if node.startswith("w1@"))
    assert workers_up(survivor) == 2
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    deadline = time.monotonic() + 30
    while workers_up(survivor) != 1:
        assert time.monotonic() < deadline, "the killed worker still counts as up"
        time.sleep(0.5)
    assert second.poll() is None


def test_reasoning_tokens_and_cut_replies_reach_the_operators_view() -> None:
    """What a worker's metrics endpoint serves, summed and shown by ``rewardq stats``."""
    from prometheus_client import generate_latest

    from rewardq.monitoring.metrics import WorkerMetrics
    from rewardq.stats_view import FleetMetrics, StatsSnapshot, render

    metrics = WorkerMetrics()
    metrics.usage("gpt-5-mini", 100, 900, 0.01, reasoning_tokens=850)
    metrics.judge_call("gpt-5-mini", "ok", 1.0)
    metrics.judge_call("gpt-5-mini", "cut", 2.0)
    fleet = FleetMetrics()
    fleet.add_exposition(generate_latest(metrics.registry).decode())
    fleet.add_exposition(generate_latest(metrics.registry).decode())  # a second worker
    assert (fleet.reasoning_tokens, fleet.cut_replies, fleet.judge_errors) == (1700, 2, 2)
    assert fleet.completion_tokens == 1800  # the reasoning is part of it
    shown = render(StatsSnapshot(taken_at=0.0, queue_depth=0, in_progress=0, dead_letters=0,
                                 workers=[], metrics=fleet))
    assert "(cut 2)" in shown and "(1,700 reasoning)" in shown


def test_dead_letters_cleared_by_a_later_verdict_are_shown_beside_the_count() -> None:
    from rewardq.stats_view import StatsSnapshot, render

    quiet = StatsSnapshot(taken_at=0.0, queue_depth=0, in_progress=0, dead_letters=2,
                          workers=[], metrics=None)
    assert "cleared" not in render(quiet)
    cleared = StatsSnapshot(taken_at=0.0, queue_depth=0, in_progress=0, dead_letters=2,
                            workers=[], metrics=None, dead_letters_cleared=1_500)
    line = next(x for x in render(cleared).splitlines() if x.startswith("dead letters"))
    assert line.split()[2] == "2" and "1,500 cleared by a later verdict" in line
