"""Where the CPU of a judged item goes: py-spy on the workers and on the producer.

Starts the local stack as ``rewardq bench`` does (embedded Redis, the local judge at
latency L, W gevent worker processes with ``C // W`` judge calls each), runs one untimed
warm-up step, then:

1. ``--steps`` cold steps of N fresh items, ``submit`` -> ``result()``, *without* any
   profiler: CPU per item of the producer (this process) and of the workers, read as
   ``rewardq bench`` reads it (``Bench.measured``), with Redis commands per item;
2. the same number of cold steps again with ``py-spy record --nonblocking`` attached to
   every worker process and to this process (the producer). With ``--gil`` py-spy samples
   only the thread holding the GIL, so its samples are the Python CPU time (its idle
   detection alone counts threads asleep in ``time.sleep`` as busy, measured); the
   kernel time of socket calls, made without the GIL, is the workers' system CPU, read
   from ``/proc`` and shown apart. Each sample is charged to
   the innermost frame that belongs to a known part (pydantic, Celery, kombu, redis-py,
   the openai SDK, httpx, gevent, asyncio, JSON, logging, ``workers/``, ...), skipping
   neutral standard-library frames (sockets, selectors, threading, functools, ...), so a
   ``socket.send`` is charged to whichever client sent it. Inclusive shares of named
   entry points (task parsing, result storage, events, the bridge, the claim, the HTTP
   call, ...) are printed too.

Usage (root, or a user allowed to ptrace the workers)::

    .venv/bin/python benchmarks/profile_worker.py [--items 2048] [--steps 3] \\
        [--latency-ms 100] [--concurrency 256] [--workers 2] [--rate 250] [--out DIR]

The raw collapsed stacks are kept in ``--out`` (flamegraph.pl / speedscope read them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewardq.bench import Bench, BenchOptions, Run, bench_settings, make_items  # noqa: E402
from rewardq.broker.settings import Settings  # noqa: E402
from rewardq.stack import LocalStack  # noqa: E402


# Frames are "function (path:line)", the path relative to its sys.path entry
# ("redis/connection.py", "json/decoder.py", "workers/scoring.py").
def file_of(frame: str) -> str:
    """The path of a frame."""
    return frame[frame.rfind("(") + 1:].rsplit(":", 1)[0]


# Frames that say nothing about who spent the CPU: charged to the frame above them (a
# ``socket.send`` to whichever client sent, a ``copy.deepcopy`` to whoever copied).
NEUTRAL = re.compile(
    r"^(socket|ssl|selectors|threading|queue|functools|contextlib|typing|abc|enum|copy|"
    r"copyreg|weakref|_weakrefset|collections/__init__|dataclasses|types|inspect|"
    r"traceback|linecache|operator|warnings|base64|codecs|encodings/\w+|string|random|"
    r"_collections_abc|datetime|numbers|heapq|bisect|struct|zlib|posixpath|genericpath|"
    r"os|ipaddress|re/\w+|urllib/\w+|email/\w+|http/\w+|contextvars|textwrap)\.py$"
    r"|^<frozen |^<built-in"
)

# (part, pattern on the frame's path), tried from the innermost frame out; first match.
PARTS: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(pattern)) for name, pattern in [
        ("pydantic (validation, dumps, model_construct)", r"^pydantic(_core)?/"),
        ("JSON (stdlib json)", r"^json/"),
        ("logging", r"^logging/"),
        ("openai SDK (request building, options)", r"^openai/(?!_vendor)"),
        ("httpx2/httpcore (client, models, URLs)", r"^httpx2?/|^httpcore2?/|^h11/|^anyio/"),
        ("aiohttp transport", r"^aiohttp/|^yarl/|^multidict/|^aiohappyeyeballs/|"
                              r"^propcache/|^openai/_vendor/httpx_aiohttp"),
        ("redis-py (sync and asyncio clients)", r"^redis/"),
        ("kombu (broker transport)", r"^kombu/"),
        ("celery: events", r"^celery/events/"),
        ("celery: result backend", r"^celery/backends/"),
        ("celery: worker, tracer, protocol", r"^celery/|^billiard/|^vine/|^click/"),
        ("gevent (hub, patched sockets, greenlets)", r"^gevent/|^greenlet"),
        ("rewardq bridge (gevent<->asyncio)", r"^workers/bridge\.py"),
        ("asyncio event loop, streams, tasks", r"^asyncio/"),
        ("prometheus client (metrics)", r"^prometheus_client/"),
        ("uuid/hashlib", r"^uuid\.py|^hashlib\.py"),
        ("rewardq broker/ (schemas, keys, judge core)", r"^broker/"),
        ("rewardq workers/ (own code)", r"^workers/"),
        ("rewardq producer/ (own code)", r"^producer/"),
        ("rewardq monitoring/ (metrics)", r"^monitoring/"),
        ("rewardq bench harness", r"^rewardq/|profile_worker\.py"),
    ]
]

# Where a thread's samples start: its outermost frame.
THREADS: list[tuple[str, re.Pattern[str]]] = [
    ("asyncio loop thread (bridge)", re.compile(r"AsyncioBridge\._start")),
    ("watchdog / heartbeat threads", re.compile(r"watchdog\.py|heartbeat\.py")),
    ("main thread: gevent hub and greenlets", re.compile(r".")),
]

# Inclusive shares: a sample counts for each entry whose pattern is on its stack.
_TRACE = r"fast_trace_task \("
_TASK = r"score_chunk \("
_LOOP = r"AsyncioBridge\._start"
_POST = r"AsyncAPIClient\.post \("
_SUBMIT = r"RewardClient\.submit \("
_RESULT = r"PendingScores\.(result|_wait|as_completed) \("

# Inclusive shares: (name, pattern on a frame, pattern of an outer frame it must be under).
ENTRIES: dict[str, list[tuple[str, str, str | None]]] = {
    "worker": [
        ("main thread: Celery consumer (drain_events, BRPOP, decode)", r"drain_events \(",
         None),
        ("main thread: task trace (fast_trace_task)", _TRACE, None),
        ("  score_chunk body", _TASK, _TRACE),
        ("    parse_chunk_message (pydantic per item)", r"parse_chunk_message \(", _TASK),
        ("    AsyncioBridge.run (greenlet side)", r"AsyncioBridge\.run \(", _TASK),
        ("    chunk_result + ScoreResult.model_dump", r"chunk_result \(|model_dump \(", _TASK),
        ("    hooks (dead letters, metrics, leases)",
         r"\(workers/(hooks|dead_lettering|leases)\.py", _TASK),
        ("  result backend: STARTED + result", r"Backend\.store_result \(", _TRACE),
        ("  task events (EventDispatcher)", r"EventDispatcher\.", _TRACE),
        ("task events, anywhere on the main thread", r"EventDispatcher\.", None),
        ("  ack", r"Message\.ack \(|basic_ack \(", _TRACE),
        ("main thread: hub loop (outermost Hub.run)", r"^Hub\.run \(", None),
        ("loop thread: everything", _LOOP, None),
        ("  ChunkScorer.score (claim, fan-out, gather)", r"ChunkScorer\.score \(", _LOOP),
        ("    JudgeCache.claim (Lua, per chunk)", r"JudgeCache\.claim \(", _LOOP),
        ("  ChunkScorer._resolve (per owned item)", r"ChunkScorer\._resolve \(", _LOOP),
        ("    JudgeCache.store (Lua, per item)", r"JudgeCache\.store \(", _LOOP),
        ("    JudgeClient.complete", r"JudgeClient\.complete \(", _LOOP),
        ("      openai AsyncAPIClient.post (the whole SDK call)", _POST, _LOOP),
        ("        openai: build request (options, headers, URL)",
         r"BaseClient\._build_request \(|FinalRequestOptions|_prepare_options", _POST),
        ("        httpx2 AsyncClient.send (incl. transport)", r"AsyncClient\.send \(", _POST),
        ("          aiohttp transport", r"AiohttpTransport\.handle_async_request \(", _POST),
        ("        response body read (aread)", r"Response\.aread \(", _POST),
        ("      rate limiter / budget (not in_step, which wraps the chunk)",
         r"^(?!in_step ).*\(workers/(rate_limit|budget)\.py", _LOOP),
        ("      read_reply (JSON parse of the reply)", r"read_reply \(", _LOOP),
        ("    judge_request / judge_verdict", r"judge_request \(|judge_verdict \(", _LOOP),
        ("  ChunkScorer._await_result (per item)", r"_await_result \(", _LOOP),
        ("  metrics (prometheus)", r"\((monitoring|prometheus_client)/", _LOOP),
        ("  uuid4 (lock tokens, idempotency keys)", r"uuid4 \(", _LOOP),
        ("  gevent-patched sockets under asyncio", r"\(gevent/", _LOOP),
        ("logging (anywhere)", r"\(logging/", None),
    ],
    "producer": [
        ("RewardClient.submit", _SUBMIT, None),
        ("  item validation (pydantic)", r"\(pydantic|model_validate", _SUBMIT),
        ("  fingerprints", r"judge_fingerprint \(", _SUBMIT),
        ("  Redis (MGET of the cache, job keys)", r"\(redis/", _SUBMIT),
        ("  publish chunks (send_task, kombu)", r"send_task \(|\(kombu/", _SUBMIT),
        ("PendingScores.result (polling, collecting)", _RESULT, None),
        ("  Redis round trips (redis-py)", r"\(redis/", _RESULT),
        ("  JSON decode of results", r"\(json/", _RESULT),
        ("  ScoreResult.model_validate per item", r"model_validate \(", _RESULT),
    ],
}


@dataclass
class Profile:
    """Collapsed stacks of one process group (all its threads), as py-spy wrote them."""

    stacks: Counter[tuple[str, ...]] = field(default_factory=Counter)

    @property
    def samples(self) -> int:
        return sum(self.stacks.values())

    def add_file(self, path: Path) -> None:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                self.stacks[tuple(stack.split(";"))] += int(count)

    def by_part(self) -> Counter[str]:
        parts: Counter[str] = Counter()
        for frames, count in self.stacks.items():
            parts[part_of(frames)] += count
        return parts

    def inclusive(self, pattern: str, within: str | None = None) -> int:
        """Samples with a frame matching ``pattern`` (below one matching ``within``)."""
        regex = re.compile(pattern)
        outer = re.compile(within) if within else None
        total = 0
        for frames, count in self.stacks.items():
            start = 0
            if outer is not None:
                start = next((i + 1 for i, f in enumerate(frames) if outer.search(f)), -1)
                if start < 0:
                    continue
            total += count if any(regex.search(f) for f in frames[start:]) else 0
        return total

    def by_thread(self) -> Counter[str]:
        threads: Counter[str] = Counter()
        for frames, count in self.stacks.items():
            threads[next(name for name, p in THREADS if p.search(frames[0]))] += count
        return threads

    def top_leaves(self, n: int) -> list[tuple[str, int]]:
        leaves: Counter[str] = Counter()
        for frames, count in self.stacks.items():
            leaves[innermost(frames)] += count
        return leaves.most_common(n)


def innermost(frames: tuple[str, ...]) -> str:
    """The innermost frame that is not neutral standard library."""
    for frame in reversed(frames):
        if not NEUTRAL.search(file_of(frame)):
            return frame
    return frames[-1]


def part_of(frames: tuple[str, ...]) -> str:
    """The part the innermost non-neutral frame belongs to."""
    for frame in reversed(frames):
        path = file_of(frame)
        if NEUTRAL.search(path):
            continue
        for name, pattern in PARTS:
            if pattern.search(path):
                return name
        return f"other: {path}"
    return "standard library (sockets, threads, ...)"


def command_calls(bench: Bench) -> Counter[str]:
    """Redis' calls per command so far (``INFO commandstats``; Lua's own calls count)."""
    stats = bench.client.redis.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def user_sys_s(pids: Iterable[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids``, from ``/proc``."""
    user = system = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11]) / _TICKS
        system += int(fields[12]) / _TICKS
    return user, system


_TICKS = os.sysconf("SC_CLK_TCK")


def start_spy(pid: int, output: Path, rate: int) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--gil",
         "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_spies(spies: Iterable[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def table(title: str, counts: list[tuple[str, int]], total: int, cpu_ms: float) -> str:
    lines = [f"{title}: {total} samples; ms per item = share x {cpu_ms:.3f} ms",
             f"  {'share':>6} {'ms/item':>8}  part"]
    lines += [f"  {c / total:>6.1%} {cpu_ms * c / total:>8.3f}  {name}" for name, c in counts]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rewardq-profile"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    options = BenchOptions(items=args.items, latency_ms=args.latency_ms,
                           concurrency=args.concurrency, workers=args.workers)
    settings = bench_settings(Settings(), options)
    n = args.items
    print(f"N={n} L={args.latency_ms:g} ms C={args.concurrency} W={args.workers} "
          f"steps={args.steps} cores={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    with LocalStack(settings, workers=args.workers,
                    judge_latency_ms=args.latency_ms) as stack:
        bench = Bench(stack)
        try:
            bench.rewardq_step(make_items(n, f"warmup-{uuid.uuid4().hex[:8]}"))
            pids = {"producer": [os.getpid()],
                    "worker": [p.pid for p in stack.worker_processes]}
            submits: list[tuple[float, float]] = []  # (wall s, CPU s) of submit() alone

            def step() -> Run:
                items = make_items(n, f"plain-{uuid.uuid4().hex[:8]}")
                cpu, started = time.process_time(), time.perf_counter()
                pending = bench.client.submit(items)
                submits.append((time.perf_counter() - started, time.process_time() - cpu))
                results = pending.result(timeout=stack.settings.chunk_deadline_s, partial=True)
                wall = time.perf_counter() - started
                return Run(wall_s=wall, items=n,
                           failed=sum(r.status.value != "ok" for r in results))

            user0, sys0 = user_sys_s(pids["worker"])
            commands0 = command_calls(bench)
            plain = [bench.measured(step) for _ in range(args.steps)]
            commands1 = command_calls(bench)
            user1, sys1 = user_sys_s(pids["worker"])
            files: dict[str, list[Path]] = {"producer": [], "worker": []}
            spies = []
            for role, role_pids in pids.items():
                for pid in role_pids:
                    path = args.out / f"{role}-{pid}.txt"
                    files[role].append(path)
                    spies.append(start_spy(pid, path, args.rate))
            time.sleep(2.0)  # py-spy attaches
            profiled = [bench.measured(lambda: bench.rewardq_step(
                make_items(n, f"spied-{uuid.uuid4().hex[:8]}"))) for _ in range(args.steps)]
            stop_spies(spies)
        finally:
            bench.close()

    def per_item_ms(runs: list[Any], attr: str) -> float:
        return float(sum(getattr(r, attr) for r in runs) / sum(r.items for r in runs) * 1000)

    figures = {
        "producer_ms": per_item_ms(plain, "producer_cpu_s"),
        "workers_ms": per_item_ms(plain, "workers_cpu_s"),
        "redis_ms": per_item_ms(plain, "redis_cpu_s"),
        "judge_ms": per_item_ms(plain, "judge_cpu_s"),
        "workers_user_ms": (user1 - user0) / (n * len(plain)) * 1000,
        "workers_sys_ms": (sys1 - sys0) / (n * len(plain)) * 1000,
        "redis_calls_per_item": {name: calls / (n * len(plain)) for name, calls in
                                 (commands1 - commands0).most_common()},
        "redis_commands_per_item": sum(r.redis_commands for r in plain) / (n * len(plain)),
        "wall_s": [r.wall_s for r in plain],
        "failed": sum(r.failed for r in plain),
        "submit_wall_ms": [w * 1000 for w, _ in submits],
        "submit_cpu_ms": [c * 1000 for _, c in submits],
        "profiled_workers_ms": per_item_ms(profiled, "workers_cpu_s"),
        "profiled_producer_ms": per_item_ms(profiled, "producer_cpu_s"),
    }
    ours = figures["producer_ms"] + figures["workers_ms"]
    print(f"unprofiled, CPU ms per item: ours {ours:.3f} = producer "
          f"{figures['producer_ms']:.3f} + workers {figures['workers_ms']:.3f} (user "
          f"{figures['workers_user_ms']:.3f}, system {figures['workers_sys_ms']:.3f}); redis "
          f"{figures['redis_ms']:.3f}, judge {figures['judge_ms']:.3f}; Redis commands per "
          f"item {figures['redis_commands_per_item']:.2f}; walls "
          f"{', '.join(f'{w:.2f}' for w in figures['wall_s'])} s; failed {figures['failed']}")
    print("Redis calls per item, by command (Lua's own included): " + ", ".join(
        f"{name} {v:.2f}" for name, v in figures["redis_calls_per_item"].items() if v >= 0.005))
    print(f"submit() of {n} items: wall "
          f"{', '.join(f'{w:.0f}' for w in figures['submit_wall_ms'])} ms, CPU "
          f"{', '.join(f'{c:.0f}' for c in figures['submit_cpu_ms'])} ms")
    print(f"profiled (py-spy attached): workers {figures['profiled_workers_ms']:.3f}, "
          f"producer {figures['profiled_producer_ms']:.3f} ms per item\n")
    report: dict[str, Any] = {"figures": figures, "roles": {}}
    for role, cpu_ms in (("worker", figures["workers_ms"]),
                         ("producer", figures["producer_ms"])):
        profile = Profile()
        for path in files[role]:
            if path.exists():
                profile.add_file(path)
        total = profile.samples
        if not total:
            print(f"{role}: no samples (is py-spy allowed to attach?)")
            continue
        threads = profile.by_thread().most_common()
        print(table(f"{role} processes, by thread", threads, total, cpu_ms))
        parts = profile.by_part().most_common()
        print(table(f"{role} processes, by part (innermost frame)", parts, total, cpu_ms))
        entries = [(name, profile.inclusive(pattern, within))
                   for name, pattern, within in ENTRIES[role]]
        print(table(f"{role} processes, inclusive (on the stack)", entries, total, cpu_ms))
        leaves = profile.top_leaves(25)
        print(table(f"{role} processes, top innermost frames", leaves, total, cpu_ms))
        print()
        report["roles"][role] = {"samples": total, "threads": dict(threads),
                                 "parts": dict(parts),
                                 "entries": dict(entries), "leaves": dict(leaves)}
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
