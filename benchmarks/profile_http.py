"""CPU of one judge call, by HTTP client: what the openai SDK costs on top of the exchange.

A worker's asyncio loop spends most of its CPU inside ``AsyncOpenAI.post`` (see
``benchmarks/PROFILE.md``). This starts the local judge (``--latency-ms``, 0 by default)
and sends the same chat-completions body ``--requests`` times, ``--concurrency`` at a
time, through each client in turn, repeated ``--repeats`` times (interleaved), and
reports the median CPU ms per request of this process (``time.process_time``, all
threads) and the wall time:

- ``openai+aiohttp``: ``AsyncOpenAI(http_client=DefaultAioHttpClient()).post(...,
  cast_to=httpx2.Response)``, the raw route ``workers/judge_client.py`` takes today;
- ``openai+httpx``: the same on the SDK's default httpx transport;
- ``aiohttp``: one ``aiohttp.ClientSession``, the body serialized once per call with
  ``json.dumps``, fixed headers, ``await response.read()``;
- ``httpx2``: one ``httpx2.AsyncClient``, the same.

Every reply is checked (status 200, content read). ``--gevent`` monkey-patches first,
as a worker process is (its asyncio loop then selects through gevent).

Usage::

    .venv/bin/python benchmarks/profile_http.py [--requests 2000] [--concurrency 64] \\
        [--repeats 3] [--gevent]
"""

from __future__ import annotations

import sys

if "--gevent" in sys.argv:  # before anything imports socket, as celery -P gevent does
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402
import httpx2  # noqa: E402
import openai  # noqa: E402

from rewardq.broker.schemas import ScoreItem  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.judge.judge_core import COMPLETIONS_PATH, judge_request, judge_spec, read_reply  # noqa: E402
from rewardq.judge.rubrics import builtin_rubrics  # noqa: E402
from rewardq.stack import start_judge  # noqa: E402

Post = Callable[[dict[str, Any]], Awaitable[bytes]]


def body_for(settings: Settings) -> dict[str, Any]:
    rubrics = builtin_rubrics()
    spec = judge_spec(settings, rubrics)
    item = ScoreItem(id="1", prompt="What is 17 + 25?", response="It is 42.", reference="42")
    item = item.model_copy(update={"rubric": rubrics.select(item)})
    return judge_request(spec, rubrics.rubric_for(spec, item), item)


async def make_clients(base_url: str, key: str) -> tuple[dict[str, Post], list[Any]]:
    """The clients, each as ``post(body) -> reply bytes``, and what to close."""
    sdk_aiohttp = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                                     http_client=openai.DefaultAioHttpClient())
    sdk_httpx = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    session = aiohttp.ClientSession()
    plain = httpx2.AsyncClient(timeout=60)
    url = base_url.rstrip("/") + COMPLETIONS_PATH
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def sdk(client: openai.AsyncOpenAI) -> Post:
        async def post(body: dict[str, Any]) -> bytes:
            response = await client.post(COMPLETIONS_PATH, cast_to=httpx2.Response, body=body)
            return bytes(response.content)
        return post

    async def via_aiohttp(body: dict[str, Any]) -> bytes:
        async with session.post(url, data=json.dumps(body).encode(), headers=headers) as r:
            content = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
            return content

    async def via_httpx(body: dict[str, Any]) -> bytes:
        r = await plain.post(url, content=json.dumps(body).encode(), headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}")
        return r.content

    clients = {"openai+aiohttp": sdk(sdk_aiohttp), "openai+httpx": sdk(sdk_httpx),
               "aiohttp": via_aiohttp, "httpx2": via_httpx}
    return clients, [sdk_aiohttp, sdk_httpx, session, plain]


async def run_once(post: Post, body: dict[str, Any], requests: int, concurrency: int
                   ) -> tuple[float, float]:
    """(CPU ms per request, wall s) of ``requests`` posts, ``concurrency`` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            reply = read_reply(await post(body))
            if reply.content is None:
                raise RuntimeError("a reply without content")

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    return (time.process_time() - cpu) / requests * 1000, time.perf_counter() - wall


async def bench(base_url: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    settings = Settings()
    body = body_for(settings)
    clients, closers = await make_clients(base_url, settings.judge_api_key.get_secret_value())
    try:
        for post in clients.values():  # warm-up: connection pools, first-call imports
            await run_once(post, body, min(args.requests, 2 * args.concurrency),
                           args.concurrency)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
        for _ in range(args.repeats):
            for name, post in clients.items():
                samples[name].append(await run_once(post, body, args.requests,
                                                    args.concurrency))
    finally:
        for closer in closers:
            await (closer.aclose() if hasattr(closer, "aclose") else closer.close())
    return {name: {"cpu_ms_per_request": statistics.median(s[0] for s in runs),
                   "wall_s": statistics.median(s[1] for s in runs)}
            for name, runs in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--gevent", action="store_true", help="monkey.patch_all() first")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    judge = start_judge(latency_ms=args.latency_ms)
    try:
        before = judge.stats()["process_cpu_s"]
        results = asyncio.run(bench(judge.base_url, args))
        judge_cpu = judge.stats()["process_cpu_s"] - before
    finally:
        judge.stop()
    total = args.requests * (args.repeats + 1) * len(results)
    print(f"{args.requests} requests x {args.repeats} repeats, concurrency "
          f"{args.concurrency}, judge latency {args.latency_ms:g} ms, gevent "
          f"{'patched' if args.gevent else 'off'}; judge server CPU "
          f"{judge_cpu / total * 1000:.3f} ms per request")
    base = results["openai+aiohttp"]["cpu_ms_per_request"]
    print(f"{'client':<16}{'CPU ms/req':>11}{'wall s':>8}{'vs openai+aiohttp':>19}")
    for name, r in results.items():
        print(f"{name:<16}{r['cpu_ms_per_request']:>11.3f}{r['wall_s']:>8.2f}"
              f"{r['cpu_ms_per_request'] / base:>18.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
