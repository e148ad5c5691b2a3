"""Throughput of the local judge server, so a benchmark of rewardq never measures it instead.

Starts ``python -m rewardq.judge_server --port 0`` in a subprocess, then drives it from separate
load-generator processes (aiohttp client on uvloop when installed, pre-encoded rewardq
judge prompts, one distinct prompt per request) and reports, per scenario: requests/s,
the server process's CPU seconds per request (from its ``/stats``; its inverse is what
one server core can sustain), peak requests in flight and the status counts. Default
scenarios:

* latency 0 ms, 256 concurrent: raw request-handling cost;
* latency 100 ms, 1000 concurrent: a slow judge with many calls held open.

Usage::

    .venv/bin/python benchmarks/judge_server_throughput.py [--requests 20000]
        [--client-procs 1] [--server-loop auto|uvloop|asyncio] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewardq.broker.schemas import ScoreItem  # noqa: E402  (needs ROOT on the path)
from rewardq.judge.rubrics import builtin_rubrics  # noqa: E402
from rewardq.judge_server.server import loop_factory  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    """One load shape: judge latency and client concurrency."""

    latency_ms: float
    concurrency: int
    requests: int


@dataclass(frozen=True)
class Outcome:
    """What one scenario measured."""

    latency_ms: float
    concurrency: int
    requests: int
    wall_s: float
    requests_per_s: float
    server_cpu_s: float
    server_cpu_us_per_request: float
    server_capacity_per_core: float
    max_in_flight: int
    responses_by_status: dict[str, int]


def request_bodies(start: int, count: int) -> list[bytes]:
    """Chat-completions bodies for items ``start .. start+count``, half with a reference."""
    rubrics = builtin_rubrics()
    bodies = []
    for i in range(start, start + count):
        item = ScoreItem(
            id=str(i),
            prompt=f"Question {i}: what is {i} + {i}? Show your work.",
            response=f"We add {i} and {i}.\nThe answer is {2 * i}." * (1 + i % 3),
            reference=str(2 * i) if i % 2 else None,
        )
        bodies.append(
            json.dumps(
                {
                    "model": "rewardq-local-judge",
                    "messages": rubrics.rubrics[rubrics.select(item)].messages(item),
                    "temperature": 0.0,
                    "max_tokens": 64,
                }
            ).encode()
        )
    return bodies


async def drive(url: str, bodies: list[bytes], concurrency: int) -> int:
    """Post every body with at most ``concurrency`` in flight; returns the 200 count."""
    queue = iter(bodies)
    ok = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer local"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def lane() -> None:
            nonlocal ok
            for body in queue:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok += response.status == 200

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return ok


def client_process(
    url: str, start: int, count: int, concurrency: int, go: Any, results: Any
) -> None:
    """One load generator: builds its bodies, waits for ``go``, posts them."""
    bodies = request_bodies(start, count)
    go.wait()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        results.put(runner.run(drive(url, bodies, concurrency)))


def http_json(session_url: str, method: str = "GET", payload: Any = None) -> Any:
    """A blocking JSON call to the judge's admin routes (outside the measured window)."""

    async def call() -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, session_url, json=payload) as response,
        ):
            return await response.json()

    return asyncio.run(call())


def run_scenario(base: str, scenario: Scenario, client_procs: int) -> Outcome:
    """Measure one scenario against the judge at ``base`` (no ``/v1``)."""
    http_json(f"{base}/admin/config", "POST", {"latency_ms": scenario.latency_ms})
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    results = ctx.Queue()
    share = scenario.requests // client_procs
    lanes = max(scenario.concurrency // client_procs, 1)
    procs = [
        ctx.Process(
            target=client_process,
            args=(f"{base}/v1/chat/completions", k * share, share, lanes, go, results),
        )
        for k in range(client_procs)
    ]
    for proc in procs:
        proc.start()
    time.sleep(2.0 + 0.5 * client_procs)  # let the clients build their bodies
    http_json(f"{base}/stats/reset", "POST")
    before = http_json(f"{base}/stats")["process_cpu_s"]
    started = time.perf_counter()
    go.set()
    ok = sum(results.get() for _ in procs)
    wall = time.perf_counter() - started
    for proc in procs:
        proc.join()
    stats = http_json(f"{base}/stats")
    sent = share * client_procs
    if ok != sent:
        print(f"warning: {sent - ok} of {sent} requests not answered 200", file=sys.stderr)
    cpu = stats["process_cpu_s"] - before
    return Outcome(
        latency_ms=scenario.latency_ms,
        concurrency=lanes * client_procs,
        requests=sent,
        wall_s=round(wall, 3),
        requests_per_s=round(sent / wall),
        server_cpu_s=round(cpu, 3),
        server_cpu_us_per_request=round(cpu / sent * 1e6, 1),
        server_capacity_per_core=round(sent / cpu) if cpu > 0 else 0,
        max_in_flight=stats["max_in_flight"],
        responses_by_status=stats["responses_by_status"],
    )


def start_server(loop: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m rewardq.judge_server --port 0``; returns the process and its base URL
    (no /v1)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "judge_server", "--port", "0", "--loop", loop],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"judge server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1].strip().removesuffix("/v1")


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print one line each (and a JSON file with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per scenario")
    parser.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="load-generator processes (each with its own event loop)",
    )
    parser.add_argument("--server-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="the server's event loop (auto: uvloop when installed)")
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    args = parser.parse_args(argv)
    scenarios = [Scenario(0.0, 256, args.requests), Scenario(100.0, 1000, args.requests)]
    proc, base = start_server(args.server_loop)
    outcomes = []
    try:
        for scenario in scenarios:
            outcome = run_scenario(base, scenario, args.client_procs)
            outcomes.append(outcome)
            print(
                f"latency {outcome.latency_ms:5.0f} ms  concurrency {outcome.concurrency:5d}  "
                f"requests {outcome.requests:6d}  {outcome.requests_per_s:6d} req/s  "
                f"server CPU {outcome.server_cpu_us_per_request:6.1f} us/req "
                f"(~{outcome.server_capacity_per_core} req/s per core)  "
                f"max in flight {outcome.max_in_flight}  {outcome.responses_by_status}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
