"""The local judge's behaviour knobs: one frozen value, replaced whole at runtime.

Set at startup from CLI flags and changed while running by ``POST /admin/config`` with
any subset of the fields as JSON; a request handler reads the current value once, so a
change never tears a request in half.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: The port rewardq's settings point at by default (``rewardq.broker.settings.LOCAL_JUDGE_PORT``).
#: Repeated, not imported: the judge stands in for a third-party API and shares no code
#: with its clients.
DEFAULT_PORT = 8008
#: The model name rewardq's settings ask for by default (``REWARDQ_JUDGE_MODEL``).
DEFAULT_MODEL = "rewardq-local-judge"

#: Fault kinds ``error_kinds`` may name: HTTP statuses, plus a hang and a scoreless reply.
FAULT_KINDS = ("429", "500", "503", "400", "401", "timeout", "malformed")

#: Which kind of judge the server plays (``rewardq.judge_server.profiles`` says how each answers).
PROFILES = ("plain", "openai-reasoning", "think-in-content", "reasoning-field",
            "digit-logprobs")
#: ``reasoning_effort`` values an OpenAI reasoning model takes on chat completions.
REASONING_EFFORTS = ("minimal", "low", "medium", "high")
#: The effort a request without ``reasoning_effort`` gets (OpenAI's documented default).
DEFAULT_REASONING_EFFORT = "medium"
#: Reasoning tokens the ``openai-reasoning`` profile spends per effort (settable).
DEFAULT_REASONING_TOKENS: tuple[tuple[str, int], ...] = (
    ("high", 4096), ("low", 256), ("medium", 1024), ("minimal", 0))
#: Where the ``digit-logprobs`` judge puts the probability it does not give its score.
DIGIT_NEIGHBOURS = ("inward", "up", "down")
#: The knobs that choose and shape a profile, with their defaults (a test resets them).
PROFILE_FIELDS = ("profile", "model_profiles", "refuse_response_format", "thinking_tokens",
                  "think_tag_in_prompt", "reasoning_tokens", "digit_confidence",
                  "digit_neighbour")


class ConfigValueError(ValueError):
    """A judge-server knob with an unknown name or a value it cannot take."""


@dataclass(frozen=True)
class JudgeConfig:
    """How the local judge behaves.

    Attributes:
        latency_ms: time spent "thinking" before each answer.
        jitter_ms: latency varies uniformly within ``latency_ms ± jitter_ms`` (not below 0).
        seed: seeds the generator that draws jitter and faults, for reproducible runs.
        error_rate: fraction (0..1) of requests answered with an injected fault.
        error_kinds: faults to draw from, uniformly; see ``FAULT_KINDS``.
        retry_after_s: ``Retry-After`` sent with an injected 429.
        timeout_sleep_s: how long a ``timeout`` fault stalls before answering normally.
        rpm_limit: accepted requests per sliding 60 s window; 0 means unlimited.
        model: the model ``GET /v1/models`` lists (any requested model is accepted).
        logprobs: answer ``logprobs: true`` requests with per-token logprobs; ``False``
            acts like an endpoint without logprobs support (the fields are ignored and
            ``choices[0].logprobs`` is ``null``).
        position_bias: pairwise group prompts (``rewardq.judge_server.group_grading``): how often
            (0..1) a close pair goes to the response shown first, by a draw fixed by the
            seed and the pair (so the same pair is biased in both orders); 0 = unbiased.
        position_bias_margin: grades this close or closer count as a close pair (0: only
            equal grades).
        model_offsets: per requested model name, a number added to every score it gives
            (clamped to 1-10), so one server plays several judges that disagree, e.g.
            ``{"judge-lenient": 2, "judge-harsh": -3}`` (ensembles).
        profile: the kind of judge played, one of ``PROFILES`` (``rewardq.judge_server.profiles``):
            ``plain`` (the default), ``openai-reasoning``, ``think-in-content``,
            ``reasoning-field`` or ``digit-logprobs``.
        model_profiles: per requested model name, a profile that replaces ``profile`` for
            requests naming that model, e.g. ``{"judge-r1": "think-in-content"}``: one
            server plays an ensemble of a reasoning and a non-reasoning judge.
        refuse_response_format: answer a body carrying a ``response_format`` other than
            ``text`` with the 400 an endpoint without structured outputs sends.
        thinking_tokens: length of the thinking the ``think-in-content`` and
            ``reasoning-field`` profiles write before their verdict (4 characters a token).
        think_tag_in_prompt: ``think-in-content`` / ``reasoning-field``: the reply does not
            open its thinking with ``<think>\\n`` (the chat template put it at the end of
            the prompt, as DeepSeek-R1's does): it only closes it with ``</think>``.
        reasoning_tokens: ``openai-reasoning``: reasoning tokens spent per
            ``reasoning_effort`` (a mapping; effort names missing from it keep
            ``DEFAULT_REASONING_TOKENS``).
        digit_confidence: ``digit-logprobs``: the probability q the judge gives the score
            it writes; the rest, 1 - q, goes to one neighbour (0.5..1).
        digit_neighbour: ``digit-logprobs``: which neighbour gets 1 - q: ``inward`` (towards
            the middle of the scale: 1-5 -> score + 1, 6-10 -> score - 1), ``up``
            (score + 1; 10 -> 9) or ``down`` (score - 1; 1 -> 2).

    Raises:
        ConfigValueError: a value out of range or of the wrong type.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    seed: int = 0
    error_rate: float = 0.0
    error_kinds: tuple[str, ...] = ("429", "500")
    retry_after_s: float = 0.2
    timeout_sleep_s: float = 30.0
    rpm_limit: int = 0
    model: str = DEFAULT_MODEL
    logprobs: bool = True
    position_bias: float = 0.0
    position_bias_margin: int = 0
    model_offsets: tuple[tuple[str, int], ...] = ()
    profile: str = "plain"
    model_profiles: tuple[tuple[str, str], ...] = ()
    refuse_response_format: bool = False
    thinking_tokens: int = 256
    think_tag_in_prompt: bool = False
    reasoning_tokens: tuple[tuple[str, int], ...] = DEFAULT_REASONING_TOKENS
    digit_confidence: float = 0.8
    digit_neighbour: str = "inward"

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "retry_after_s", "timeout_sleep_s"):
            _require(_is_real(getattr(self, name)) and getattr(self, name) >= 0,
                     name, "a finite number >= 0")
            object.__setattr__(self, name, float(getattr(self, name)))
        _require(_is_real(self.error_rate) and 0.0 <= self.error_rate <= 1.0,
                 "error_rate", "a number in [0, 1]")
        object.__setattr__(self, "error_rate", float(self.error_rate))
        _require(_is_int(self.seed), "seed", "an integer")
        _require(_is_int(self.rpm_limit) and self.rpm_limit >= 0, "rpm_limit",
                 "an integer >= 0 (0 = unlimited)")
        _require(isinstance(self.model, str) and bool(self.model), "model", "a non-empty string")
        _require(isinstance(self.logprobs, bool), "logprobs", "true or false")
        _require(_is_real(self.position_bias) and 0.0 <= self.position_bias <= 1.0,
                 "position_bias", "a number in [0, 1]")
        object.__setattr__(self, "position_bias", float(self.position_bias))
        _require(_is_int(self.position_bias_margin) and 0 <= self.position_bias_margin <= 9,
                 "position_bias_margin", "an integer in [0, 9]")
        offsets = self.model_offsets
        if isinstance(offsets, Mapping):
            offsets = tuple(sorted(offsets.items()))
            object.__setattr__(self, "model_offsets", offsets)
        _require(isinstance(offsets, tuple) and all(
            isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
            and _is_int(pair[1]) for pair in offsets),
            "model_offsets", "an object of model name -> integer offset")
        _require(isinstance(self.error_kinds, tuple) and bool(self.error_kinds)
                 and all(kind in FAULT_KINDS for kind in self.error_kinds),
                 "error_kinds", f"a non-empty list drawn from {list(FAULT_KINDS)}")
        _require(self.profile in PROFILES, "profile", f"one of {list(PROFILES)}")
        profiles = self.model_profiles
        if isinstance(profiles, Mapping):
            profiles = tuple(sorted(profiles.items()))
            object.__setattr__(self, "model_profiles", profiles)
        _require(isinstance(profiles, tuple) and all(
            isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)
            and pair[1] in PROFILES for pair in profiles),
            "model_profiles", f"an object of model name -> profile (one of {list(PROFILES)})")
        _require(isinstance(self.refuse_response_format, bool), "refuse_response_format",
                 "true or false")
        _require(_is_int(self.thinking_tokens) and 1 <= self.thinking_tokens <= 1_000_000,
                 "thinking_tokens", "an integer in [1, 1000000]")
        _require(isinstance(self.think_tag_in_prompt, bool), "think_tag_in_prompt",
                 "true or false")
        tokens = self.reasoning_tokens
        if isinstance(tokens, Mapping):
            _require(all(isinstance(effort, str) for effort in tokens), "reasoning_tokens",
                     f"an object of effort ({'/'.join(REASONING_EFFORTS)}) -> tokens")
            merged: dict[str, Any] = dict(DEFAULT_REASONING_TOKENS)
            merged.update(dict(tokens))
            tokens = tuple((effort, merged[effort]) for effort in sorted(merged))
            object.__setattr__(self, "reasoning_tokens", tokens)
        _require(isinstance(tokens, tuple) and all(
            isinstance(pair, tuple) and len(pair) == 2 and pair[0] in REASONING_EFFORTS
            and _is_int(pair[1]) and 0 <= pair[1] <= 10_000_000 for pair in tokens)
            and {pair[0] for pair in tokens} == set(REASONING_EFFORTS),
            "reasoning_tokens",
            f"an object of effort ({'/'.join(REASONING_EFFORTS)}) -> tokens (an integer >= 0)")
        _require(_is_real(self.digit_confidence) and 0.5 <= self.digit_confidence <= 1.0,
                 "digit_confidence", "a number in [0.5, 1]")
        object.__setattr__(self, "digit_confidence", float(self.digit_confidence))
        _require(self.digit_neighbour in DIGIT_NEIGHBOURS, "digit_neighbour",
                 f"one of {list(DIGIT_NEIGHBOURS)}")

    def profile_for(self, model: str) -> str:
        """The profile a request naming ``model`` gets: its ``model_profiles`` entry, else
        ``profile``."""
        if not self.model_profiles:
            return self.profile
        return dict(self.model_profiles).get(model, self.profile)

    def reasoning_tokens_for(self, effort: str) -> int:
        """Reasoning tokens the ``openai-reasoning`` profile spends at ``effort``."""
        return dict(self.reasoning_tokens)[effort]

    def updated(self, changes: Mapping[str, Any]) -> JudgeConfig:
        """A copy with ``changes`` applied, as JSON gives them (lists, ``null``, numbers).

        ``error_kinds`` may be a list or a comma-separated string; ``rpm_limit`` ``null``
        means unlimited.

        Raises:
            ConfigValueError: an unknown field or an invalid value; nothing is applied.
        """
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigValueError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
        values = dict(changes)
        if "error_kinds" in values:
            values["error_kinds"] = parse_error_kinds(values["error_kinds"])
        if "rpm_limit" in values and values["rpm_limit"] is None:
            values["rpm_limit"] = 0
        return dataclasses.replace(self, **values)

    def as_dict(self) -> dict[str, Any]:
        """The knobs as JSON-ready values (what ``GET /admin/config`` returns)."""
        values = dataclasses.asdict(self)
        values["error_kinds"] = list(self.error_kinds)
        values["model_offsets"] = dict(self.model_offsets)
        values["reasoning_tokens"] = dict(self.reasoning_tokens)
        values["model_profiles"] = dict(self.model_profiles)
        return values


def profile_defaults() -> dict[str, Any]:
    """The profile knobs (``PROFILE_FIELDS``) at their defaults, JSON-ready: what
    ``POST /admin/config`` takes to put a judge back to the ``plain`` profile."""
    values = JudgeConfig().as_dict()
    return {name: values[name] for name in PROFILE_FIELDS}


def parse_error_kinds(value: str | Iterable[Any]) -> tuple[str, ...]:
    """``"429,500"`` or ``["429", 500]`` as a tuple of fault-kind strings.

    Raises:
        ConfigValueError: not a string or a list of strings/integers.
    """
    if isinstance(value, str):
        return tuple(kind.strip() for kind in value.split(",") if kind.strip())
    if isinstance(value, list | tuple) and all(
        isinstance(kind, str) or _is_int(kind) for kind in value
    ):
        return tuple(str(kind).strip() for kind in value)
    raise ConfigValueError(f"error_kinds must be a list or a comma-separated string: {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ConfigValueError(f"{name} must be {expected}")
