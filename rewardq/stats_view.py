"""``rewardq stats``: a live terminal view of the fleet, refreshing in place.

Where each number comes from (one snapshot costs three Celery broadcasts, a Redis
pipeline and one HTTP scrape per worker):

- queue depth: ``LLEN rewardq.judge`` (chunks waiting; kombu's base priority list);
  in progress: ``HLEN unacked`` (chunks delivered to a worker and not yet acked);
- dead letters: ``ZCARD rewardq:dead:index``; cleared by a later verdict of the same work:
  ``rewardq:stats:letters_cleared``;
- workers: their heartbeats in Redis (``rewardq.broker.fleet``: pid, queues, age of the last
  beat; a worker whose last beat is older than two beat periods is shown ``down``, and
  one whose beat expired is gone), with Celery ``inspect stats`` (pool size, chunks
  processed) and ``inspect active`` (chunks running now) for those that answer;
- judge requests and failures, cache hit rate, items by status, retries, tokens and
  cost: the sum of every worker's Prometheus endpoint (``rewardq.monitoring.metrics``), found
  with the ``rewardq_metrics`` inspect command. Workers run without an endpoint when
  ``REWARDQ_METRICS_PORT`` is unset; these rows then read ``-``. Cache hits answered
  by the producer before enqueueing never reach a worker: producers count them in
  ``rewardq:stats:submit_cache_hits``, which the hit rate includes;
- judge budget (a line when the run has a limit): ``rewardq:budget:run:<run>`` of the
  settings' ``budget_run`` (``rewardq.budget_cli``): spent, reserved by the calls in
  flight, the limits and the calls refused, fleet-wide;
- throughput: the difference between two snapshots (chunks/s from Celery's counts,
  items/s and judge calls/s from the metrics), so ``--once`` shows totals only.

Counters of a worker restart from zero with it; a rate that would go negative is shown
as ``-`` for that refresh.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import httpx
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from rewardq.broker.app import QUEUE_JUDGE, TASK_SCORE_CHUNK, create_app
from rewardq.broker.connections import redis_client
from rewardq.broker.fleet import BEAT_INTERVAL_S, live_workers
from rewardq.broker.keys import (
    CACHE_EVICTIONS,
    DEAD_INDEX,
    DEAD_LETTERS_CLEARED,
    SUBMIT_CACHE_HITS,
)
from rewardq.broker.settings import Settings
from rewardq.budget_cli import BudgetState, read_budget
from rewardq.monitoring.metrics import INSPECT_COMMAND

UNACKED_HASH = "unacked"
"""kombu's Redis transport keeps delivered, unacknowledged messages in this hash."""

CLEAR_SCREEN = "\x1b[H\x1b[2J"


#: A worker whose last heartbeat is older than this is shown ``down``.
DOWN_AFTER_S = 2 * BEAT_INTERVAL_S


@dataclass(frozen=True)
class WorkerRow:
    """One worker: its heartbeat, and what Celery reports of it."""

    node: str
    pid: int | None
    concurrency: int | None
    processed: int
    active: int
    metrics_url: str | None = None
    beat_age_s: float | None = None

    @property
    def up(self) -> bool:
        """A recent heartbeat (workers without one, e.g. of an older version, count up
        while they answer Celery's broadcast)."""
        return self.beat_age_s is None or self.beat_age_s <= DOWN_AFTER_S


@dataclass
class FleetMetrics:
    """Worker metrics summed over every endpoint scraped."""

    judge_requests: float = 0.0
    judge_errors: float = 0.0
    cache_hits: float = 0.0
    cache_misses: float = 0.0
    dedup_waits: float = 0.0
    rate_limit_wait_s: float = 0.0
    retries: float = 0.0
    items: dict[str, float] = field(default_factory=dict)
    chunks: dict[str, float] = field(default_factory=dict)
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    reasoning_tokens: float = 0.0
    #: judge replies cut by their token limit before a verdict
    cut_replies: float = 0.0
    cost_usd: float = 0.0
    submit_cache_hits: float = 0.0

    @property
    def cache_hit_rate(self) -> float | None:
        """Items answered from the cache (at submit or by a worker) / items looked up;
        ``None`` before any lookup."""
        hits = self.cache_hits + self.submit_cache_hits
        lookups = hits + self.cache_misses
        return hits / lookups if lookups else None

    @property
    def items_failed(self) -> float:
        """Items whose result is not ``ok``."""
        return sum(n for status, n in self.items.items() if status != "ok")

    def add_exposition(self, text: str) -> None:
        """Add the ``rewardq_*`` samples of one endpoint's scrape."""
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self._add(sample.name, sample.labels, sample.value)

    def _add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        scalar = {"rewardq_cache_hits_total": "cache_hits",
                  "rewardq_cache_misses_total": "cache_misses",
                  "rewardq_dedup_waits_total": "dedup_waits",
                  "rewardq_rate_limit_wait_seconds_total": "rate_limit_wait_s",
                  "rewardq_retries_total": "retries",
                  "rewardq_judge_prompt_tokens_total": "prompt_tokens",
                  "rewardq_judge_completion_tokens_total": "completion_tokens",
                  "rewardq_judge_reasoning_tokens_total": "reasoning_tokens",
                  "rewardq_judge_cost_usd_total": "cost_usd"}.get(name)
        if scalar is not None:
            setattr(self, scalar, getattr(self, scalar) + value)
        elif name == "rewardq_judge_requests_total":
            self.judge_requests += value
            if labels.get("status") != "ok":
                self.judge_errors += value
            if labels.get("status") == "cut":
                self.cut_replies += value
        elif name in ("rewardq_items_total", "rewardq_chunks_total"):
            into = self.items if name == "rewardq_items_total" else self.chunks
            status = labels.get("status", "?")
            into[status] = into.get(status, 0.0) + value


@dataclass(frozen=True)
class StatsSnapshot:
    """What the fleet looked like at ``taken_at`` (unix time)."""

    taken_at: float
    queue_depth: int
    in_progress: int
    dead_letters: int
    workers: list[WorkerRow]
    metrics: FleetMetrics | None
    #: letters cleared because the same work got a verdict later (ever)
    dead_letters_cleared: int = 0
    endpoints_scraped: int = 0
    errors: list[str] = field(default_factory=list)
    submit_cache_hits: int = 0
    budget: BudgetState | None = None
    #: Redis' used_memory and maxmemory (0: no cap); ``None`` where INFO was refused
    redis_used_bytes: int | None = None
    redis_maxmemory_bytes: int | None = None
    #: verdicts the cache deleted to make room, and keys Redis evicted itself
    cache_evictions: int = 0
    redis_evicted_keys: int = 0

    @property
    def workers_up(self) -> int:
        """Workers with a recent heartbeat."""
        return sum(w.up for w in self.workers)

    @property
    def chunks_processed(self) -> int:
        """Chunks the live workers have finished (Celery's per-process counts)."""
        return sum(w.processed for w in self.workers)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``rewardq stats --once --json``)."""
        data = asdict(self)
        if self.metrics is not None:
            data["metrics"]["cache_hit_rate"] = self.metrics.cache_hit_rate
            data["metrics"]["items_failed"] = self.metrics.items_failed
        data["chunks_processed"] = self.chunks_processed
        data["workers_up"] = self.workers_up
        for row, worker in zip(data["workers"], self.workers, strict=True):
            row["up"] = worker.up
        return data


def collect(app: Celery, client: redis.Redis, *, timeout_s: float = 1.0,
            http: httpx.Client | None = None, budget_run: str | None = None
            ) -> StatsSnapshot:
    """Take one snapshot of the fleet.

    Args:
        app: a Celery app on the fleet's broker.
        client: a Redis client on the same Redis.
        timeout_s: how long to wait for the workers' broadcast replies.
        http: the client that scrapes metrics endpoints (one is made if ``None``).
        budget_run: also read this run's judge budget (``Settings.budget_run``).
    """
    errors: list[str] = []
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(QUEUE_JUDGE)
        pipe.hlen(UNACKED_HASH)
        pipe.zcard(DEAD_INDEX)
        pipe.get(SUBMIT_CACHE_HITS)
        pipe.get(CACHE_EVICTIONS)
        pipe.get(DEAD_LETTERS_CLEARED)
        depth, in_progress, dead, submit_hits, cache_evictions, cleared = pipe.execute()
    try:
        memory, redis_stats = client.info("memory"), client.info("stats")
    except redis.ResponseError:  # a managed Redis that refuses INFO
        memory, redis_stats = {}, {}
    now = time.time()
    beats = {beat.node: beat for beat in live_workers(client, queue=None)}
    stats = app.control.inspect(timeout=timeout_s).stats() or {}
    # The stats replies say how many workers there are: the next broadcasts stop waiting
    # as soon as that many have answered.
    limit = len(stats) or None
    active = app.control.inspect(timeout=timeout_s, limit=limit).active() or {} \
        if stats else {}
    advertised: dict[str, Any] = {}
    if stats:
        for answer in app.control.broadcast(INSPECT_COMMAND, reply=True, timeout=timeout_s,
                                            limit=limit) or []:
            advertised.update(answer)
    rows = []
    for node in sorted(set(stats) | set(beats)):
        info, beat = stats.get(node) or {}, beats.get(node)
        endpoint = advertised.get(node)
        url = endpoint.get("url") if isinstance(endpoint, dict) else None
        rows.append(WorkerRow(node=node, pid=info.get("pid") or (beat.pid if beat else None),
                              concurrency=(info.get("pool") or {}).get("max-concurrency"),
                              processed=int((info.get("total") or {}).get(TASK_SCORE_CHUNK, 0)),
                              active=len(active.get(node) or []), metrics_url=url,
                              beat_age_s=max(0.0, now - beat.beat_at) if beat else None))
    metrics, scraped = _scrape([r.metrics_url for r in rows if r.metrics_url], http, errors)
    if metrics is not None:
        metrics.submit_cache_hits = float(submit_hits or 0)
    budget = read_budget(client, budget_run) if budget_run is not None else None
    return StatsSnapshot(taken_at=time.time(), queue_depth=int(depth),
                         in_progress=int(in_progress), dead_letters=int(dead),
                         dead_letters_cleared=int(cleared or 0),
                         workers=rows, metrics=metrics, endpoints_scraped=scraped,
                         errors=errors, submit_cache_hits=int(submit_hits or 0),
                         budget=budget, redis_used_bytes=memory.get("used_memory"),
                         redis_maxmemory_bytes=memory.get("maxmemory"),
                         cache_evictions=int(cache_evictions or 0),
                         redis_evicted_keys=int(redis_stats.get("evicted_keys", 0)))


def _memory_line(s: StatsSnapshot) -> str:
    """``redis memory  412.3 MB of 1073.7 MB (38%)   cache evictions 0   redis evicted 0``."""
    used, cap = s.redis_used_bytes, s.redis_maxmemory_bytes
    if used is None:
        head = f"{'unknown':>10}"
    elif not cap:
        head = f"{used / 1e6:>7,.1f} MB of no cap (set maxmemory: docs/memory.md)"
    else:
        head = f"{used / 1e6:>7,.1f} MB of {cap / 1e6:,.1f} MB ({used / cap:.0%})"
    return (f"redis memory    {head}   cache evictions {s.cache_evictions:,}"
            f"   redis evicted {s.redis_evicted_keys:,}")


def _scrape(urls: Iterable[str], http: httpx.Client | None,
            errors: list[str]) -> tuple[FleetMetrics | None, int]:
    urls = list(urls)
    if not urls:
        return None, 0
    own = http is None
    client = http or httpx.Client(timeout=2.0)
    total, scraped = FleetMetrics(), 0
    try:
        for url in urls:
            try:
                response = client.get(url)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                errors.append(f"cannot scrape {url}: {exc}")
                continue
            total.add_exposition(response.text)
            scraped += 1
    finally:
        if own:
            client.close()
    return (total if scraped else None), scraped


def _rate(now: float, before: float, seconds: float) -> str:
    if seconds <= 0 or now < before:
        return "-"
    return f"{(now - before) / seconds:,.1f}/s"


def render(current: StatsSnapshot, previous: StatsSnapshot | None = None, *,
           live: bool = False) -> str:
    """The text of one refresh; rates need ``previous`` (else they read ``-``); ``live``
    adds how to quit."""
    dt = current.taken_at - previous.taken_at if previous else 0.0
    m, pm = current.metrics, previous.metrics if previous else None
    when = time.strftime("%H:%M:%S", time.localtime(current.taken_at))
    chunk_rate = _rate(current.chunks_processed, previous.chunks_processed, dt) \
        if previous else "-"
    lines = [f"rewardq stats  {when}" + ("  (Ctrl-C quits)" if live else ""), "",
             f"queue depth     {current.queue_depth:>10,} chunks waiting"
             f"   in progress {current.in_progress:,}",
             f"dead letters    {current.dead_letters:>10,}"
             + (f"   {current.dead_letters_cleared:,} cleared by a later verdict"
                if current.dead_letters_cleared else ""),
             f"workers         {current.workers_up:>10,} up"
             + (f", {len(current.workers) - current.workers_up} down"
                if current.workers_up < len(current.workers) else "")
             + f"   chunks done {current.chunks_processed:,} ({chunk_rate})",
             f"cache at submit {current.submit_cache_hits:>10,} items answered without a "
             f"worker",
             _memory_line(current)]
    if current.budget is not None and current.budget.limited:
        lines.append(_budget_line(current.budget))
    if m is None:
        lines.append("metrics         no worker serves metrics (set REWARDQ_METRICS_PORT)")
    else:
        items_ok = m.items.get("ok", 0.0)
        item_rate = _rate(items_ok + m.items_failed,
                          pm.items.get("ok", 0.0) + pm.items_failed, dt) if pm else "-"
        call_rate = _rate(m.judge_requests, pm.judge_requests, dt) if pm else "-"
        hit = f"{m.cache_hit_rate:.1%}" if m.cache_hit_rate is not None else "-"
        lines += [
            f"items           {items_ok:>10,.0f} ok   {m.items_failed:,.0f} failed"
            f"   ({item_rate})",
            f"judge calls     {m.judge_requests:>10,.0f}   errors {m.judge_errors:,.0f}"
            f" (cut {m.cut_replies:,.0f})   retries {m.retries:,.0f}   ({call_rate})",
            f"cache hit rate  {hit:>10}   dedup waits {m.dedup_waits:,.0f}"
            f"   rate-limit wait {m.rate_limit_wait_s:,.1f}s",
            f"tokens          {m.prompt_tokens:>10,.0f} in   {m.completion_tokens:,.0f} out"
            f" ({m.reasoning_tokens:,.0f} reasoning)",
            f"cost            {m.cost_usd:>10,.4f} USD",
        ]
    if current.workers:
        lines += ["", f"{'worker':<32} {'state':>6} {'beat':>6} {'pid':>8} {'pool':>6} "
                      f"{'active':>7} {'done':>8}"]
        for w in current.workers:
            beat = f"{w.beat_age_s:.0f}s" if w.beat_age_s is not None else "-"
            lines.append(f"{w.node:<32} {'up' if w.up else 'DOWN':>6} {beat:>6} "
                         f"{w.pid or '-':>8} {w.concurrency or '-':>6} "
                         f"{w.active:>7} {w.processed:>8}")
    lines += [f"! {e}" for e in current.errors]
    return "\n".join(lines)


def _budget_line(b: BudgetState) -> str:
    spent = f"{b.spent_usd:>10,.4f} USD spent"
    if b.limit_usd is not None:
        spent += f" of {b.limit_usd:,.4f} ({b.spent_usd / b.limit_usd:.1%})"
    step = f"   step limit {b.step_limit_usd:,.4f}" if b.step_limit_usd is not None else ""
    return (f"budget          {spent}   in flight {b.reserved_usd:,.4f}{step}"
            f"   refused {b.refused:,}   run {b.run}")


def run_stats(settings: Settings, *, once: bool = False, interval_s: float = 2.0,
              as_json: bool = False, out: TextIO | None = None,
              timeout_s: float = 1.0) -> int:
    """Show the fleet: refreshing every ``interval_s`` until Ctrl-C, or one snapshot.

    Args:
        settings: the broker to look at.
        once: print one snapshot and return.
        interval_s: seconds between refreshes.
        as_json: print snapshots as JSON lines instead of text.
        out: where to write (default stdout).
        timeout_s: how long to wait for the workers' broadcast replies.

    Returns:
        The exit status: 0.
    """
    out = out or sys.stdout
    app = create_app(settings)
    client = redis_client(settings)
    live = not once and not as_json and out.isatty()
    previous: StatsSnapshot | None = None
    try:
        with httpx.Client(timeout=2.0) as http, contextlib.suppress(KeyboardInterrupt):
            while True:
                current = collect(app, client, timeout_s=timeout_s, http=http,
                                  budget_run=settings.budget_run)
                if as_json:
                    out.write(json.dumps(current.as_dict()) + "\n")
                else:
                    out.write((CLEAR_SCREEN if live else "")
                              + render(current, previous, live=live)
                              + "\n" + ("" if live else "\n"))
                out.flush()
                if once:
                    return 0
                previous = current
                time.sleep(max(0.0, interval_s - (time.time() - current.taken_at)))
    finally:
        client.close()
        app.close()
    return 0
