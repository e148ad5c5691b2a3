"""What ``rewardq serve`` adds: a step through the HTTP gateway vs the in-process client.

One local stack (embedded Redis, the local judge at latency L, W worker processes) and
one ``rewardq serve`` process on it. Each repeat scores two fresh N-item steps (cold
cache, distinct content), one each way, alternating which goes first:

* ``in_process``: ``RewardClient.submit(items).result()`` in this process, what a Python
  trainer does;
* ``gateway``: ``POST /v1/score`` with the same kind of items as JSON, the reply parsed
  back into ``ScoreResult`` s (a client's whole cost: encode, HTTP, the gateway's
  validation and its own submit and wait, decode).

Reports the median wall of each, their ratio (the issue's bar: ≤ 1.10), and the CPU the
gateway process spent per item (from ``/proc``). Pick N, L and W so the fleet, not this
machine's CPU, is the bottleneck, or both ways measure the same saturated CPU.

``--per-rollout`` sends the gateway's side as OpenRLHF 0.11 does: one ``/get_reward``
POST per rollout, all N at once (aiohttp), against ``--token-concurrency`` slots of the
token's queue, and reports besides the walls how many requests were refused (429) and
the most that waited in the queue at once.

Usage::

    .venv/bin/python benchmarks/bench_gateway.py [--items 2048] [--latency-ms 200]
        [--workers 2] [--concurrency 512] [--repeats 5] [--json FILE]
        [--per-rollout] [--token-concurrency 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gateway_harness import running_gateway  # noqa: E402  (needs ROOT/tests on the path)

from rewardq.bench import make_items, proc_cpu_s  # noqa: E402
from rewardq.broker.schemas import ResultStatus, ScoreResult  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.producer.client import RewardClient  # noqa: E402
from rewardq.stack import LocalStack  # noqa: E402


def in_process_step(client: RewardClient, items: list[dict[str, Any]]) -> float:
    """Wall seconds of one step through the in-process client."""
    started = time.perf_counter()
    results = client.submit(items).result(timeout=600)
    wall = time.perf_counter() - started
    _check(results, items)
    return wall


def gateway_step(http: httpx.Client, items: list[dict[str, Any]]) -> float:
    """Wall seconds of one step through ``POST /v1/score``, reply parsed."""
    started = time.perf_counter()
    reply = http.post("/v1/score", json={"items": items, "timeout_s": 600})
    reply.raise_for_status()
    results = [ScoreResult.model_validate(r) for r in reply.json()["results"]]
    wall = time.perf_counter() - started
    _check(results, items)
    return wall


def per_rollout_step(url: str, items: list[dict[str, Any]]) -> tuple[float, int]:
    """Wall seconds of one step sent as one ``/get_reward`` request per rollout, all at
    once; and how many were answered 429."""
    async def send() -> list[tuple[int, Any]]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=180)) as session:
            async def one(item: dict[str, Any]) -> tuple[int, Any]:
                body = {"query": [item["prompt"] + item["response"]],
                        "prompts": [item["prompt"]], "labels": [item.get("reference")]}
                async with session.post(f"{url}/get_reward?label_as=metadata",
                                        json=body) as reply:
                    return reply.status, await reply.json()
            return list(await asyncio.gather(*(one(i) for i in items)))

    started = time.perf_counter()
    replies = asyncio.run(send())
    wall = time.perf_counter() - started
    refused = sum(status == 429 for status, _ in replies)
    if any(status not in (200, 429) for status, _ in replies):
        raise SystemExit(f"a rollout came back {sorted({s for s, _ in replies})}")
    return wall, refused


def _peak_queued(url: str, stop: threading.Event, peak: list[float]) -> None:
    with httpx.Client(timeout=10) as http:
        while not stop.is_set():
            for line in http.get(f"{url}/metrics").text.splitlines():
                if line.startswith("rewardq_gateway_requests_queued{"):
                    peak[0] = max(peak[0], float(line.rsplit(" ", 1)[1]))
            time.sleep(0.05)


def _check(results: list[ScoreResult], items: list[dict[str, Any]]) -> None:
    bad = sum(r.status is not ResultStatus.OK for r in results)
    if bad or [r.id for r in results] != [i["id"] for i in items]:
        raise SystemExit(f"a step came back wrong: {bad} not ok, or out of order")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack and the gateway, run the interleaved repeats; the report."""
    base = Settings().model_copy(update={
        "redis_url": None, "judge_base_url": Settings.model_fields["judge_base_url"].default,
        "max_concurrent_requests": max(1, args.concurrency // args.workers)})
    gateway_settings = {"gateway_token_concurrency": args.token_concurrency,
                        "gateway_rm_timeout_s": 170.0}
    with LocalStack(base, workers=args.workers, judge_latency_ms=args.latency_ms) as stack, \
            running_gateway(stack.settings.model_copy(update=gateway_settings)) as gw, \
            httpx.Client(base_url=gw.url, timeout=660) as http, \
            RewardClient(stack.settings) as client:
        warm = min(args.items, 256)
        in_process_step(client, make_items(warm, f"wu-i-{uuid.uuid4().hex[:8]}"))
        gateway_step(http, make_items(warm, f"wu-g-{uuid.uuid4().hex[:8]}"))
        walls: dict[str, list[float]] = {"in_process": [], "gateway": []}
        gateway_cpu: list[float] = []
        refused: list[int] = []
        peak = [0.0]
        stop = threading.Event()
        watcher = threading.Thread(target=_peak_queued, args=(gw.url, stop, peak))
        if args.per_rollout:
            watcher.start()
        for r in range(args.repeats):
            nonce = uuid.uuid4().hex[:10]
            order = ["in_process", "gateway"] if r % 2 == 0 else ["gateway", "in_process"]
            for way in order:
                items = make_items(args.items, f"{way[0]}-{nonce}")
                if way == "in_process":
                    walls[way].append(in_process_step(client, items))
                else:
                    cpu = proc_cpu_s(gw.process.pid)
                    if args.per_rollout:
                        wall, no = per_rollout_step(gw.url, items)
                        walls[way].append(wall)
                        refused.append(no)
                    else:
                        walls[way].append(gateway_step(http, items))
                    gateway_cpu.append(proc_cpu_s(gw.process.pid) - cpu)
            print(f"repeat {r + 1}/{args.repeats}: in-process {walls['in_process'][-1]:.3f}s, "
                  f"gateway {walls['gateway'][-1]:.3f}s", file=sys.stderr, flush=True)
        stop.set()
        if args.per_rollout:
            watcher.join()
    med = {k: statistics.median(v) for k, v in walls.items()}
    ratio = med["gateway"] / med["in_process"]
    ratios = [g / i for g, i in zip(walls["gateway"], walls["in_process"], strict=True)]
    return {
        "items": args.items, "latency_ms": args.latency_ms, "workers": args.workers,
        "judge_concurrency": args.concurrency, "repeats": args.repeats,
        "per_rollout": args.per_rollout, "token_concurrency": args.token_concurrency,
        "refused_429": sum(refused), "peak_queued_requests": peak[0],
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "in_process_wall_s": round(med["in_process"], 4),
        "gateway_wall_s": round(med["gateway"], 4),
        "ratio": round(ratio, 4),
        "paired_ratios": [round(x, 4) for x in ratios],
        "within_10_percent": ratio <= 1.10,
        "gateway_cpu_ms_per_item": round(statistics.median(gateway_cpu) / args.items * 1e3, 4),
        "runs_wall_s": {k: [round(x, 4) for x in v] for k, v in walls.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=512,
                        help="judge calls in flight fleet-wide")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--per-rollout", action="store_true",
                        help="the gateway's side as one /get_reward request per rollout")
    parser.add_argument("--token-concurrency", type=int, default=1024,
                        help="REWARDQ_GATEWAY_TOKEN_CONCURRENCY of the gateway")
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"gateway / in-process wall: {report['ratio']:.3f} (median of {args.repeats}; "
          f"bar 1.10: {'met' if report['within_10_percent'] else 'NOT met'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
