"""``rewardq failed list | show ID | replay (--all | ID...) | purge``: dead letters by hand.

A few lines on top of ``rewardq.broker.dead_letters.DeadLetters``; every error the library
raises on purpose (``DeadLetterNotFound``, ``BrokerUnavailableError``) becomes one line on
stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable

from rewardq.broker.dead_letters import DeadLetter, DeadLetters
from rewardq.broker.errors import BrokerUnavailableError, DeadLetterNotFound
from rewardq.broker.settings import Settings


def add_failed_parser(
        subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``failed`` and its subcommands on ``rewardq``'s subparsers.

    Each subcommand sets ``func(args, settings) -> int`` (the exit status).
    """
    failed = subparsers.add_parser("failed", help="list, show, replay or purge dead letters")
    actions = failed.add_subparsers(dest="failed_command", required=True)

    listing = actions.add_parser("list", help="dead letters, newest first")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    listing.add_argument("--json", action="store_true", help="one JSON letter per line")
    listing.set_defaults(func=_list)

    show = actions.add_parser("show", help="one dead letter in full, as JSON")
    show.add_argument("id")
    show.set_defaults(func=_show)

    replay = actions.add_parser("replay", help="re-enqueue dead letters and remove them")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter")
    which.add_argument("ids", nargs="*", default=[], metavar="ID")
    replay.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for the replayed work and report its outcome")
    replay.set_defaults(func=_replay)

    purge = actions.add_parser("purge", help="delete dead letters (all, or the IDs given)")
    purge.add_argument("ids", nargs="*", default=[], metavar="ID")
    purge.set_defaults(func=_purge)
    return failed


def _list(args: argparse.Namespace, settings: Settings) -> int:
    def run(letters: DeadLetters) -> int:
        found = letters.list(limit=args.limit or None)
        if args.json:
            for letter in found:
                print(letter.model_dump_json())
            return 0
        if not found:
            print("no dead letters")
            return 0
        print(f"{'ID':<40} {'FAILED AT (UTC)':<19} {'STEP':>5} {'REASON':<13} "
              f"{'TRIES':>5} {'ITEM':<20} ERROR")
        for letter in found:
            print(_row(letter))
        total = letters.count()
        if args.limit and total > len(found):
            print(f"{len(found)} of {total} dead letter(s), newest first; "
                  f"`rewardq failed list --limit 0` lists all")
        else:
            print(f"{len(found)} dead letter(s)")
        return 0
    return _with_letters(settings, run)


def _show(args: argparse.Namespace, settings: Settings) -> int:
    def run(letters: DeadLetters) -> int:
        print(json.dumps(letters.show(args.id).model_dump(mode="json"), indent=2))
        return 0
    return _with_letters(settings, run)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    if not args.all and not args.ids:
        print("error: give dead-letter IDs or --all", file=sys.stderr)
        return 2

    def run(letters: DeadLetters) -> int:
        replay = letters.replay_all() if args.all else letters.replay(args.ids)
        if not replay.replayed:
            print("nothing to replay")
            return 0
        print(f"replayed {len(replay.replayed)} dead letter(s) as job {replay.job_id} "
              f"({len(replay.task_ids)} task(s))")
        if replay.missing:
            print(f"skipped {len(replay.missing)} already taken by another replay or purge: "
                  + " ".join(replay.missing))
        if args.wait <= 0:
            return 0
        counts = letters.outcome(replay, args.wait)
        print("outcome: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        return 0 if set(counts) <= {"ok"} else 1
    return _with_letters(settings, run)


def _purge(args: argparse.Namespace, settings: Settings) -> int:
    def run(letters: DeadLetters) -> int:
        count = letters.purge(args.ids or None)
        print(f"purged {count} dead letter(s)")
        return 0
    return _with_letters(settings, run)


def _with_letters(settings: Settings, run: Callable[[DeadLetters], int]) -> int:
    letters = DeadLetters.from_settings(settings)
    try:
        code: int = run(letters)
    except DeadLetterNotFound as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    except BrokerUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        letters.close()
    return code


def _row(letter: DeadLetter) -> str:
    when = datetime.datetime.fromtimestamp(letter.failed_at, datetime.UTC)
    step = "-" if letter.step is None else str(letter.step)
    error = " ".join(letter.error.split())
    return (f"{letter.id:<40} {when:%Y-%m-%d %H:%M:%S} {step:>5} {letter.reason:<13} "
            f"{letter.attempts:>5} {(letter.item_id or '-')[:20]:<20} {error[:100]}")
