"""``python -m rewardq.judge_server``: the local judge in the foreground.

Prints ``judge server listening on http://HOST:PORT/v1`` once it accepts connections
(with the real port when ``--port 0``) and exits 0 on SIGINT or SIGTERM. ``rewardq
judge-server`` is the same command: its subparser gets its options from
:func:`add_arguments` and runs :func:`serve`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rewardq.judge_server.config import (
    DEFAULT_MODEL,
    DEFAULT_PORT,
    DEFAULT_REASONING_EFFORT,
    DIGIT_NEIGHBOURS,
    FAULT_KINDS,
    PROFILES,
    REASONING_EFFORTS,
    ConfigValueError,
    JudgeConfig,
    parse_error_kinds,
)
from rewardq.judge_server.server import LOOPS, run

DESCRIPTION = ("Local OpenAI-compatible LLM judge: deterministic grading, "
               "injectable latency, faults and rate limits, and profiles that answer "
               "the way today's reasoning judges do.")

#: What ``--help`` says about the profiles (``rewardq.judge_server.profiles`` has the details).
PROFILES_EPILOG = """\
profiles (--profile), each modelled on the provider's own documentation:
  plain             a non-reasoning judge (GPT-4.1/4o class): every common
                    parameter accepted, the JSON verdict at once (the default).
  openai-reasoning  GPT-5.x / o-series on chat completions (OpenAI API reference,
                    /v1/chat/completions; reasoning guide): 400 for max_tokens
                    (code unsupported_parameter, "Use 'max_completion_tokens'
                    instead"), for temperature/top_p other than 1 (unsupported_value),
                    for logprobs/top_logprobs, logit_bias and the penalties
                    (unsupported_parameter), for parameters the API does not know
                    (unknown_parameter); takes max_completion_tokens and
                    reasoning_effort (minimal/low/medium/high, default medium). Hidden
                    reasoning (--reasoning-tokens) counts against
                    max_completion_tokens: too small a budget gives empty content with
                    finish_reason "length"; usage.completion_tokens includes it and
                    usage.completion_tokens_details.reasoning_tokens reports it.
  think-in-content  an R1 distill / QwQ / Qwen3-thinking on vLLM or SGLang without a
                    reasoning parser: content is "<think>\\n" + thinking that opens with
                    a DRAFT verdict {"score": 11 - score} + "\\n</think>\\n\\n" + the
                    final verdict. max_completion_tokens or else max_tokens is
                    honoured: one token per 4 characters of generated text, rounded
                    up; a longer reply is cut after 4 x budget characters with
                    finish_reason "length" (a small budget cuts inside the thinking).
                    chat_template_kwargs {"enable_thinking": false} turns thinking off;
                    --think-tag-in-prompt drops the opening "<think>\\n" (R1's template).
  reasoning-field   the same models with a reasoning parser (vLLM "Reasoning
                    Outputs"): the thinking, draft included, goes to
                    message.reasoning_content and message.reasoning; content holds
                    the verdict (null while the thinking was cut);
                    completion_tokens_details.reasoning_tokens counts the thinking.
  digit-logprobs    a tokenizer that writes numbers digit by digit (Qwen, Mistral):
                    a 10 is the tokens "1","0". The judge means its grade s with
                    probability q (--digit-confidence) and one neighbour n
                    (--digit-neighbour) with 1-q; expectation q*s + (1-q)*n. At the
                    first digit "1" carries p(1)+p(10); after a "1", "0" carries
                    p(10)/(p(1)+p(10)) and the JSON token that follows the rest.
every profile answers response_format {"type": "json_schema"} with exactly the JSON
object ({"score": 7}; after the thinking where there is one), unless
--refuse-response-format.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m rewardq.judge_server``."""
    parser = argparse.ArgumentParser(prog="judge_server", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the judge server's options (every knob of ``JudgeConfig``) to ``parser``.

    ``python -m rewardq.judge_server`` and ``rewardq judge-server`` both call this, so the two
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
    parser.add_argument("--profile", choices=PROFILES, default=defaults.profile,
                        help="which kind of judge to play (see 'profiles' below; "
                             "default plain)")
    parser.add_argument("--model-profile", action="append", default=[],
                        metavar="MODEL=PROFILE",
                        help="requests naming MODEL get PROFILE instead of --profile "
                             "(repeatable): one server plays an ensemble of different judges")
    parser.add_argument("--refuse-response-format", action="store_true",
                        help="an endpoint without structured outputs: a body with a "
                             "response_format other than text gets HTTP 400, worded as "
                             "OpenAI words it for a model without Structured Outputs "
                             "(\"Invalid parameter: 'response_format' of type "
                             "'json_schema' is not supported with this model...\")")
    parser.add_argument("--thinking-tokens", type=int, default=defaults.thinking_tokens,
                        help="think-in-content / reasoning-field: length of the thinking "
                             "before the verdict, in tokens of 4 characters (default "
                             f"{defaults.thinking_tokens})")
    parser.add_argument("--think-tag-in-prompt", action="store_true",
                        help="think-in-content / reasoning-field: the reply does not open "
                             "its thinking with <think> (DeepSeek-R1's chat template ends the "
                             "prompt with it), it only closes it with </think>")
    efforts = ", ".join(f"{effort}={tokens}" for effort, tokens in sorted(
        defaults.reasoning_tokens, key=lambda pair: REASONING_EFFORTS.index(pair[0])))
    parser.add_argument("--reasoning-tokens", action="append", default=[],
                        metavar="EFFORT=N",
                        help="openai-reasoning: hidden reasoning tokens spent at a "
                             "reasoning_effort (repeatable; default "
                             f"{efforts}; no reasoning_effort = {DEFAULT_REASONING_EFFORT})")
    parser.add_argument("--digit-confidence", type=float, default=defaults.digit_confidence,
                        help="digit-logprobs: the probability q (0.5..1) the judge gives "
                             f"the score it writes (default {defaults.digit_confidence})")
    parser.add_argument("--digit-neighbour", choices=DIGIT_NEIGHBOURS,
                        default=defaults.digit_neighbour,
                        help="digit-logprobs: the value that gets 1-q: inward (towards the "
                             "middle: 1-5 -> s+1, 6-10 -> s-1; the default), up (s+1, "
                             "10 -> 9) or down (s-1, 1 -> 2)")
    parser.add_argument("--loop", choices=LOOPS, default="auto",
                        help="event loop; auto = uvloop when installed")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = PROFILES_EPILOG


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
        model_offsets=tuple(sorted(parse_model_offsets(args.model_offset).items())),
        profile=args.profile,
        model_profiles=tuple(sorted(parse_model_profiles(args.model_profile).items())),
        refuse_response_format=args.refuse_response_format,
        thinking_tokens=args.thinking_tokens, think_tag_in_prompt=args.think_tag_in_prompt,
        reasoning_tokens=tuple(sorted(
            {**dict(JudgeConfig().reasoning_tokens),
             **parse_reasoning_tokens(args.reasoning_tokens)}.items())),
        digit_confidence=args.digit_confidence, digit_neighbour=args.digit_neighbour)


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


def parse_model_profiles(values: Sequence[str]) -> dict[str, str]:
    """``["judge-r1=think-in-content"]`` as ``{"judge-r1": "think-in-content"}``.

    Raises:
        ConfigValueError: an entry that is not ``MODEL=PROFILE`` with a known profile.
    """
    profiles = {}
    for value in values:
        model, sep, profile = value.rpartition("=")
        if not sep or not model or profile not in PROFILES:
            raise ConfigValueError(f"--model-profile {value!r}: expected MODEL=PROFILE with "
                                   f"PROFILE one of {list(PROFILES)}")
        profiles[model] = profile
    return profiles


def parse_reasoning_tokens(values: Sequence[str]) -> dict[str, int]:
    """``["high=8000", "low=64"]`` as ``{"high": 8000, "low": 64}``.

    Raises:
        ConfigValueError: an entry that is not ``EFFORT=INTEGER`` with a known effort.
    """
    tokens = {}
    for value in values:
        effort, sep, number = value.partition("=")
        try:
            tokens[effort] = int(number)
        except ValueError:
            sep = ""
        if not sep or effort not in REASONING_EFFORTS:
            raise ConfigValueError(f"--reasoning-tokens {value!r}: expected EFFORT=INTEGER "
                                   f"with EFFORT one of {list(REASONING_EFFORTS)}")
    return tokens


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
    """Entry point of ``python -m rewardq.judge_server``; returns the exit status.

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
