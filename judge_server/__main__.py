"""``python -m judge_server``: the local judge in the foreground.

Prints ``judge server listening on http://HOST:PORT/v1`` once it accepts connections
(with the real port when ``--port 0``) and exits 0 on SIGINT or SIGTERM. ``rewardq
judge-server`` is the same command: its subparser gets its options from
:func:`add_arguments` and runs :func:`serve`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from judge_server.config import (
    DEFAULT_MODEL,
    DEFAULT_PORT,
    FAULT_KINDS,
    ConfigValueError,
    JudgeConfig,
    parse_error_kinds,
)
from judge_server.server import LOOPS, run

DESCRIPTION = ("Local OpenAI-compatible LLM judge: deterministic grading, "
               "injectable latency, faults and rate limits.")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m judge_server``."""
    parser = argparse.ArgumentParser(prog="judge_server", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the judge server's options (every knob of ``JudgeConfig``) to ``parser``.

    ``python -m judge_server`` and ``rewardq judge-server`` both call this, so the two
    command lines are one definition; :func:`serve` runs what they parse.
    """
    defaults = JudgeConfig()
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port; 0 picks a free one (default {DEFAULT_PORT})")
    parser.add_argument("--latency-ms", type=float, default=defaults.latency_ms,
                        help="time each answer takes")
    parser.add_argument("--jitter-ms", type=float, default=defaults.jitter_ms,
                        help="latency varies uniformly by +/- this much")
    parser.add_argument("--error-rate", type=float, default=defaults.error_rate,
                        help="fraction of requests (0..1) answered with an injected fault")
    parser.add_argument("--error-kinds", default=",".join(defaults.error_kinds),
                        help=f"comma-separated faults to inject, from {','.join(FAULT_KINDS)}")
    parser.add_argument("--retry-after-s", type=float, default=defaults.retry_after_s,
                        help="Retry-After of an injected 429")
    parser.add_argument("--timeout-sleep-s", type=float, default=defaults.timeout_sleep_s,
                        help="how long a 'timeout' fault stalls")
    parser.add_argument("--rpm-limit", type=int, default=defaults.rpm_limit,
                        help="requests accepted per sliding minute; 0 = unlimited")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the jitter and fault draws")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name /v1/models lists")
    parser.add_argument("--no-logprobs", dest="logprobs", action="store_false",
                        help="act like an endpoint without logprobs (ignore the request field)")
    parser.add_argument("--position-bias", type=float, default=defaults.position_bias,
                        help="pairwise group prompts: how often (0..1) a close pair goes to "
                             "the response shown first")
    parser.add_argument("--position-bias-margin", type=int,
                        default=defaults.position_bias_margin,
                        help="grades this close count as a close pair (0 = only ties)")
    parser.add_argument("--model-offset", action="append", default=[], metavar="MODEL=N",
                        help="add N to every score given as MODEL (repeatable): one server "
                             "plays several judges that disagree")
    parser.add_argument("--loop", choices=LOOPS, default="auto",
                        help="event loop; auto = uvloop when installed")


def config_from_args(args: argparse.Namespace) -> JudgeConfig:
    """The ``JudgeConfig`` the parsed flags describe.

    Raises:
        ConfigValueError: a flag value out of range.
    """
    return JudgeConfig(
        latency_ms=args.latency_ms, jitter_ms=args.jitter_ms, seed=args.seed,
        error_rate=args.error_rate, error_kinds=parse_error_kinds(args.error_kinds),
        retry_after_s=args.retry_after_s, timeout_sleep_s=args.timeout_sleep_s,
        rpm_limit=args.rpm_limit, model=args.model,
        position_bias=args.position_bias, position_bias_margin=args.position_bias_margin,
        logprobs=args.logprobs,
        model_offsets=tuple(sorted(parse_model_offsets(args.model_offset).items())))


def parse_model_offsets(values: Sequence[str]) -> dict[str, int]:
    """``["judge-b=2", "judge-c=-1"]`` as ``{"judge-b": 2, "judge-c": -1}``.

    Raises:
        ConfigValueError: an entry that is not ``MODEL=INTEGER``.
    """
    offsets = {}
    for value in values:
        model, sep, number = value.rpartition("=")
        try:
            offsets[model] = int(number)
        except ValueError:
            model = ""
        if not sep or not model:
            raise ConfigValueError(f"--model-offset {value!r}: expected MODEL=INTEGER")
    return offsets


def serve(args: argparse.Namespace) -> int:
    """Run the judge that ``args`` (parsed with :func:`add_arguments`' options) describes.

    Blocks until SIGINT or SIGTERM. Returns the exit status: 0, or 1 when the address
    cannot be bound.

    Raises:
        ConfigValueError: an option value out of range (nothing was started).
    """
    config = config_from_args(args)

    def announce(url: str) -> None:
        print(f"judge server listening on {url}", flush=True)

    try:
        run(args.host, args.port, config, ready_callback=announce, loop=args.loop)
    except OSError as exc:
        print(f"judge server cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m judge_server``; returns the exit status.

    Args:
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except ConfigValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
