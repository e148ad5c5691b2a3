"""The operator subcommands of ``rewardq``: ``flower`` and ``stats``.

``rewardq.cli.build_parser`` calls :func:`add_ops_parsers` with its subparsers; each
subcommand's ``func(args, settings) -> int`` runs with the settings the CLI built.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rewardq.broker.settings import Settings
from rewardq.flower import DEFAULT_ADDRESS, DEFAULT_DB, DEFAULT_PORT


def add_ops_parsers(subparsers: Any) -> None:
    """Register ``flower`` and ``stats`` on ``subparsers`` (``add_subparsers()``'s result)."""
    flower = subparsers.add_parser(
        "flower", help="Flower, the Celery dashboard, against the configured broker",
        description="Start Flower on the configured broker. Basic auth comes from "
                    "REWARDQ_FLOWER_USER / REWARDQ_FLOWER_PASSWORD; without them Flower "
                    "only listens on loopback.")
    flower.add_argument("--port", type=int, default=DEFAULT_PORT)
    flower.add_argument("--address", default=DEFAULT_ADDRESS,
                        help="interface to bind; beyond loopback requires basic auth")
    flower.add_argument("--persistent", action="store_true",
                        help="keep Flower's state across restarts in --db")
    flower.add_argument("--db", type=Path, default=Path(DEFAULT_DB),
                        help="state file for --persistent (default %(default)s)")
    flower.add_argument("--url-prefix", default=None, help="serve under this path prefix")
    flower.set_defaults(func=_flower)

    stats = subparsers.add_parser(
        "stats", help="live terminal view: queue, workers, throughput, cache, cost",
        description="Queue depth, workers, throughput, cache hit rate, failures and cost, "
                    "refreshing in place (see rewardq/stats_view.py for the sources).")
    stats.add_argument("--once", action="store_true", help="print one snapshot and exit")
    stats.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    stats.add_argument("--json", action="store_true", help="JSON lines instead of text")
    stats.add_argument("--timeout", type=float, default=1.0,
                       help="seconds to wait for the workers' replies")
    stats.set_defaults(func=_stats)


def _flower(args: argparse.Namespace, settings: Settings) -> int:
    from rewardq.flower import run_flower

    # Basic auth comes from settings.flower_user/flower_password (REWARDQ_FLOWER_*).
    run_flower(settings, args.port, args.address, persistent=args.persistent, db=args.db,
               url_prefix=args.url_prefix)


def _stats(args: argparse.Namespace, settings: Settings) -> int:
    from rewardq.stats_view import run_stats

    return run_stats(settings, once=args.once, interval_s=args.interval, as_json=args.json,
                     timeout_s=args.timeout)
