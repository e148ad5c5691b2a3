"""The ``rewardq`` console script: one subcommand per job, settings read once here.

Only the core install's modules are imported up front, so ``rewardq --help`` and the client
commands work in a core install; a command that needs an extra (:data:`COMMAND_EXTRAS`)
checks it first and, when it is missing, says in one line which extra to install.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from rewardq import __version__
from rewardq.broker.app import QUEUE_JUDGE
from rewardq.broker.errors import InvalidItemError, RewardqError
from rewardq.broker.settings import EMBEDDED_REDIS_PORT, Settings
from rewardq.budget_cli import add_budget_parser
from rewardq.extras import missing_modules, require
from rewardq.failed_cli import add_failed_parser
from rewardq.judge_server.config import ConfigValueError
from rewardq.ops_cli import add_ops_parsers

if TYPE_CHECKING:
    from rewardq.broker.schemas import ScoreResult
    from rewardq.producer.client import PendingScores


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from rewardq.demo import DemoOptions, run_demo

    return run_demo(settings, DemoOptions(steps=args.steps, batch=args.batch, group=args.group,
                                          latency_ms=args.latency_ms, workers=args.workers,
                                          mode=args.mode, gpu_ms=args.gpu_ms,
                                          concurrency=args.concurrency,
                                          generation_ms=args.generation_ms))


def _redis(args: argparse.Namespace, settings: Settings) -> int:
    from rewardq.broker.embedded import EmbeddedRedis

    data_dir = Path(args.dir) if args.dir else None
    with EmbeddedRedis(port=args.port, data_dir=data_dir, persist=data_dir is not None) as r:
        print(f"embedded Redis listening on {r.url}  (Ctrl-C stops it)", flush=True)
        try:
            assert r.process is not None
            r.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


def _judge_server(args: argparse.Namespace, _settings: Settings) -> int:
    from rewardq.judge_server.__main__ import serve as serve_judge

    try:
        return serve_judge(args)
    except ConfigValueError as exc:
        print(f"rewardq judge-server: error: {exc}", file=sys.stderr)
        return 2


def _rubrics_check(args: argparse.Namespace, _settings: Settings) -> int:
    from rewardq.broker.errors import ConfigError
    from rewardq.judge.rubrics import load_rubrics

    try:
        book = load_rubrics(args.file)
    except ConfigError as exc:
        print(f"rewardq rubrics check: error: {exc}", file=sys.stderr)
        return 2
    default = book.default + (f", with a reference {book.default_with_reference}"
                              if book.default_with_reference else "")
    print(f"{args.file}: {len(book.rubrics)} rubric(s), default {default}")
    for rubric in book.rubrics.values():
        sources = ", ".join(rubric.data_sources) or "-"
        print(f"  {rubric.name:<20} digest {rubric.digest}  scale {rubric.scale[0]}-"
              f"{rubric.scale[1]}  score_mode {rubric.score_mode or 'run default'}  "
              f"fields {', '.join(sorted(rubric.fields))}  data_sources {sources}")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from rewardq.judge.rubrics import rubric_book

    rubric_book(settings)  # a bad rubrics file stops here with its file:line, not in Celery
    # Celery's own command line patches gevent in before anything else is imported.
    cmd = [sys.executable, "-m", "celery", "-A", "rewardq.workers.main", "worker", "-P", "gevent",
           "-c", str(args.concurrency or settings.worker_concurrency),
           "-Q", args.queues, "--loglevel", args.loglevel]
    if args.name:
        cmd += ["-n", args.name]
    if args.log_format:  # the worker module reads it back from its environment
        os.environ["REWARDQ_LOG_FORMAT"] = args.log_format
    os.execv(sys.executable, cmd)


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from rewardq.jsonl import read_items, write_results
    from rewardq.producer.client import RewardClient

    # Everything is read and checked before anything is sent: a bad file enqueues nothing.
    try:
        items = read_items(Path(args.file))
    except OSError as exc:
        print(f"error: {args.file}: cannot read it: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except InvalidItemError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        print(f"error: --out {args.out}: no directory {str(out.parent)!r}", file=sys.stderr)
        return 2
    client = RewardClient(settings)
    try:
        started = time.perf_counter()
        pending = client.submit(items)
        print(f"submitted {len(items)} items ({pending.cache_hits_at_submit} cached, "
              f"{pending.chunk_count} chunks)", file=sys.stderr)
        results = _wait_with_progress(pending, len(items), args.timeout)
    finally:
        client.close()
    write_results(results, out)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status.value] = counts.get(r.status.value, 0) + 1
    print(f"scored {len(results)} items in {time.perf_counter() - started:.2f}s: "
          + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
          + (f"; results in {out}" if out is not None else ""), file=sys.stderr)
    failed = len(results) - counts.get("ok", 0)
    if failed:
        print(f"{failed} item(s) not ok: their errors are in the results; items that failed "
              f"for good are dead letters: `rewardq failed list`", file=sys.stderr)
    return 0 if not failed else 1


def _wait_with_progress(pending: PendingScores, total: int, timeout: float
                        ) -> list[ScoreResult]:
    """Every result (unfinished ones as ``timeout``), showing progress on stderr: a bar on
    a terminal, a plain line every few seconds otherwise."""
    from tqdm import tqdm

    results: list[ScoreResult | None] = [None] * total
    tty = sys.stderr.isatty()
    started = last_line = time.monotonic()
    with tqdm(total=total, unit="item", disable=not tty, file=sys.stderr,
              desc="scoring") as bar:
        for done, (i, result) in enumerate(pending.as_completed(timeout, partial=True), 1):
            results[i] = result
            bar.update(1)
            now = time.monotonic()
            if not tty and (now - last_line >= _PROGRESS_EVERY_S or done == total):
                last_line = now
                rate = done / max(now - started, 1e-9)
                eta = (total - done) / rate if rate > 0 else float("inf")
                print(f"progress: {done}/{total} items, {rate:,.0f} items/s, "
                      f"ETA {eta:,.0f}s", file=sys.stderr, flush=True)
    return [r for r in results if r is not None]


_PROGRESS_EVERY_S = 5.0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from rewardq.broker.errors import ConfigError
    from rewardq.gateway.serve import serve

    try:
        return serve(settings, args.host, args.port, log_level=args.log_level,
                     access_log=args.access_log)
    except ConfigError as exc:
        print(f"rewardq serve: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``rewardq`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="rewardq", description="Distributed LLM-judge reward scoring for RL training.")
    parser.add_argument("--version", action="version", version=f"rewardq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a simulated training loop on the local stack")
    demo.add_argument("--steps", type=int, default=5)
    demo.add_argument("--batch", type=int, default=16, help="prompts per step")
    demo.add_argument("--group", type=int, default=8, help="responses per prompt (GRPO)")
    demo.add_argument("--latency-ms", type=float, default=200, help="local judge latency")
    demo.add_argument("--workers", type=int, default=2, help="worker processes")
    demo.add_argument("--concurrency", type=int, default=32,
                      help="judge calls in flight fleet-wide (each worker: this // workers)")
    demo.add_argument("--mode", choices=["stream", "async", "sync", "both"], default="stream",
                      help="stream: batch after generation vs streaming each rollout as it "
                           "finishes, side by side; async: the fleet; sync: the in-process "
                           "loop; both: async vs sync")
    demo.add_argument("--generation-ms", type=float, default=1500,
                      help="stream mode: the generation window rollouts finish over")
    demo.add_argument("--gpu-ms", type=float, default=200,
                      help="async/sync modes: simulated GPU work per step while the judge works")
    demo.set_defaults(func=_demo)

    redis = sub.add_parser("redis", help="embedded Redis in the foreground")
    redis.add_argument("--port", type=int, default=EMBEDDED_REDIS_PORT)
    redis.add_argument("--dir", help="data directory (keeps an append-only file)")
    redis.set_defaults(func=_redis)

    judge_help = "the local OpenAI-compatible judge"
    if _installed("judge-server"):
        from rewardq.judge_server.__main__ import DESCRIPTION as JUDGE_DESCRIPTION
        from rewardq.judge_server.__main__ import add_arguments as add_judge_server_arguments

        judge = sub.add_parser("judge-server", help=judge_help, description=JUDGE_DESCRIPTION)
        add_judge_server_arguments(judge)
        judge.set_defaults(func=_judge_server)
    else:
        _stand_in(sub, "judge-server", judge_help)

    worker = sub.add_parser("worker", help="a gevent-pooled Celery worker")
    worker.add_argument("--concurrency", type=int, default=None,
                        help="greenlets (tasks at once); default REWARDQ_WORKER_CONCURRENCY")
    worker.add_argument("--queues", default=QUEUE_JUDGE)
    worker.add_argument("--name", default=None, help="worker node name, e.g. w1@%%h")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--log-format", choices=["text", "json"], default=None,
                        help="log lines as text or one JSON object each (default "
                             "REWARDQ_LOG_FORMAT, else text)")
    worker.set_defaults(func=_worker)

    submit = sub.add_parser("submit", help="score a JSONL file of items")
    submit.add_argument("file")
    submit.add_argument("--out", help="results JSONL (default: stdout)")
    submit.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait; unfinished items are written as timeout")
    submit.set_defaults(func=_submit)

    serve = sub.add_parser(
        "serve", help="the HTTP gateway: /v1/score, OpenRLHF's /get_reward, slime's "
                      "/slime/reward, /readyz, /metrics, /docs",
        description="Score over HTTP through the worker fleet. Beyond loopback it needs "
                    "REWARDQ_API_TOKENS (comma-separated name:token).")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind")
    serve.add_argument("--port", type=int, default=8800, help="TCP port; 0 picks a free one")
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_serve)

    rubrics = sub.add_parser("rubrics", help="judge rubrics: check a rubrics file",
                             description="Rubrics are judge templates in a TOML file "
                                         "(REWARDQ_RUBRICS_FILE); see README, Rubrics.")
    rubrics_sub = rubrics.add_subparsers(dest="rubrics_command", required=True)
    check = rubrics_sub.add_parser("check", help="validate a rubrics file, list its rubrics")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_rubrics_check)

    add_failed_parser(sub)
    add_budget_parser(sub)
    add_ops_parsers(sub)
    bench_help = "time the fleet against ideal, sync and in-process asyncio"
    if _installed("bench"):
        from rewardq.bench import add_bench_parser

        add_bench_parser(sub)
    else:
        _stand_in(sub, "bench", bench_help)
    return parser


#: The extras each command needs beyond the core install, checked before it runs (the
#: local stack of ``demo`` and ``bench`` is the embedded Redis, the judge and workers).
COMMAND_EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("embedded", "judge", "trainer", "worker"),
    "bench": ("embedded", "judge", "worker"),
    "redis": ("embedded",),
    "judge-server": ("judge",),
    "worker": ("worker",),
    "flower": ("worker",),
    "stats": ("worker",),
    "serve": ("gateway",),
}


def _installed(command: str) -> bool:
    return not missing_modules(*COMMAND_EXTRAS[command])


def _stand_in(sub: Any, command: str, help_text: str) -> None:
    """Register ``command`` without its options, whose module needs a missing extra: it
    is listed in ``rewardq --help`` and, run, says which extra to install."""
    spec = ",".join(sorted(COMMAND_EXTRAS[command]))
    stand_in = sub.add_parser(command, help=f"{help_text} (needs rewardq[{spec}])",
                              description=f"{help_text}. Needs rewardq[{spec}], which is "
                                          f"not installed here.")
    stand_in.set_defaults(func=_never)


def _never(_args: argparse.Namespace, _settings: Settings) -> int:
    raise AssertionError("main() checks a command's extras before it runs")


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rewardq`` console script."""
    parser = build_parser()
    # Known arguments only, so a command whose options could not be registered (its extra
    # is missing) is told which extra to install rather than that its options are unknown.
    args, unknown = parser.parse_known_args(argv)
    try:
        require(f"rewardq {args.command}", *COMMAND_EXTRAS.get(args.command, ()))
    except RewardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # SIGTERM unwinds like Ctrl-C, so every child process started here is stopped. SIGINT
    # gets the same handler, raising at once: asyncio's own (which only cancels the main
    # task) can lose an interrupt that lands as a task finishes, and a command started in
    # the background by a script inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        settings = Settings()
    except ValidationError as exc:
        # Name the variables, never echo their values (a token or password may be one).
        bad = ", ".join(f"REWARDQ_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                        for e in exc.errors())
        print(f"error: invalid settings: {bad}", file=sys.stderr)
        return 2
    try:
        code: int = args.func(args, settings)
    except RewardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
