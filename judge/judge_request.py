"""The request body each judge accepts; pure, no I/O.

One place knows which chat-completions parameters a judge model takes, so callers never
special-case models. A model's *family* is read from its name (:func:`model_family`):

============================  ===========  =====================  ===========  ========
family                        thinks       reply budget sent as   temperature  logprobs
============================  ===========  =====================  ===========  ========
``openai-reasoning``          yes          max_completion_tokens  not sent     not sent
  (o1, o3, o4, gpt-5 but gpt-5*-chat)
``open-reasoning``            yes          max_tokens             sent         sent
  (DeepSeek-R1 and distills, QwQ, Qwen3 but *-Instruct-2507, gpt-oss, Magistral, *thinking*)
``chat`` (any other model)    no           max_tokens             sent         sent
============================  ===========  =====================  ===========  ========

A family that thinks gets a reply budget that fits its thinking
(:data:`REASONING_MAX_TOKENS`) unless one is set; the others :data:`DEFAULT_MAX_TOKENS`.
Whatever the table misses, an endpoint says itself: the workers learn a parameter it
refuses (``rewardq.workers.judge_client.LearnedRequests``), once per endpoint and model.

Per-judge options (``JudgeSpec.judge_options``, keyed by model) override the fleet-wide
ones (the spec's own fields) for that judge of an ensemble; ``extra_body`` fields are
merged last, so a user's provider-specific field (vLLM's ``chat_template_kwargs``,
``top_k``) always goes out as written.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from rewardq.broker.errors import JudgeError, PermanentJudgeError, RefusedParameterError
from rewardq.broker.schemas import JudgeOptions, JudgeSpec

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_TOKENS", "REASONING_MAX_TOKENS", "TOP_LOGPROBS", "LearnedRequests",
           "ModelFamily", "effective_options", "model_family", "reply_budget", "request_body",
           "verdict_schema"]

#: The reply budget of a judge that does not think: a verdict and a short reason.
DEFAULT_MAX_TOKENS = 64
#: The reply budget of a judge that thinks: its thinking counts against the budget.
REASONING_MAX_TOKENS = 8192
#: Alternatives asked for per token in logprobs mode: the most the OpenAI API allows, so
#: that every scale token usually makes the list.
TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class ModelFamily:
    """What a family of judge models accepts."""

    name: str
    #: the model thinks before it answers (its reasoning tokens count against the budget)
    reasons: bool
    #: the parameter that carries the reply budget
    token_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    #: a temperature may be sent (some take only their default, and refuse any other)
    temperature: bool = True
    #: ``logprobs``/``top_logprobs`` may be asked for
    logprobs: bool = True


OPENAI_REASONING = ModelFamily("openai-reasoning", reasons=True,
                               token_param="max_completion_tokens", temperature=False,
                               logprobs=False)
OPEN_REASONING = ModelFamily("open-reasoning", reasons=True)
CHAT = ModelFamily("chat", reasons=False)

_FAMILIES = (
    # An optional provider prefix ("openai/", "azure/"), then o1/o3/o4/gpt-5 (not the
    # gpt-5 chat models, which do not think).
    (re.compile(r"^(?:[\w.-]+/)?(?:o[1-9](?![\d.])|gpt-5)(?!.*-chat)", re.IGNORECASE),
     OPENAI_REASONING),
    (re.compile(r"deepseek-r1|r1-distill|qwq|qwen3(?!.*instruct-2507)(?!.*-vl)|gpt-oss"
                r"|magistral|reasoning|thinking", re.IGNORECASE), OPEN_REASONING),
)


def model_family(model: str) -> ModelFamily:
    """The family of ``model``, read from its name (``chat`` when none matches)."""
    for pattern, family in _FAMILIES:
        if pattern.search(model):
            return family
    return CHAT


def effective_options(spec: JudgeSpec) -> JudgeOptions:
    """The options of ``spec.model``: its entry in ``spec.judge_options`` over the spec's
    fleet-wide fields, ``extra_body`` merged key by key."""
    fleet = JudgeOptions(max_tokens=spec.max_tokens, temperature=spec.temperature,
                         reasoning_effort=spec.reasoning_effort, extra_body=spec.extra_body,
                         structured_output=spec.structured_output)
    own = spec.judge_options.get(spec.model)
    if own is None:
        return fleet
    merged = {**fleet.model_dump(), **own.model_dump(exclude_unset=True)}
    merged["extra_body"] = {**fleet.extra_body, **own.extra_body}
    return JudgeOptions(**merged)


def reply_budget(spec: JudgeSpec, options: JudgeOptions | None = None) -> int:
    """The reply's token budget for ``spec.model``: the one set, else the family's."""
    options = options or effective_options(spec)
    if options.max_tokens is not None:
        return options.max_tokens
    return REASONING_MAX_TOKENS if model_family(spec.model).reasons else DEFAULT_MAX_TOKENS


def verdict_schema(scale: tuple[int, int]) -> dict[str, Any]:
    """``response_format`` asking for ``{"score": <integer in scale>}`` (structured outputs,
    as OpenAI, vLLM and SGLang take it)."""
    return {"type": "json_schema", "json_schema": {
        "name": "verdict", "strict": True,
        "schema": {"type": "object",
                   "properties": {"score": {"type": "integer", "minimum": scale[0],
                                            "maximum": scale[1]}},
                   "required": ["score"], "additionalProperties": False}}}


def request_body(spec: JudgeSpec, messages: list[dict[str, str]], *,
                 max_tokens: int | None = None, logprobs: bool = False,
                 scale: tuple[int, int] | None = None,
                 structured: bool | None = None) -> dict[str, Any]:
    """The chat-completions body asking ``spec.model`` about ``messages``.

    Args:
        spec: the judge, its fleet-wide options and its per-judge ones.
        messages: the chat messages.
        max_tokens: the reply budget (default :func:`reply_budget`).
        logprobs: ask for ``top_logprobs`` (left out where the family refuses them: the
            score is then the written integer, flagged ``parsed_fallback``).
        scale: the scale of the structured verdict, when one is asked for.
        structured: ask for a structured verdict (default: the options' own setting);
            needs ``scale``.
    """
    family = model_family(spec.model)
    options = effective_options(spec)
    body: dict[str, Any] = {"model": spec.model, "messages": messages,
                            family.token_param: max_tokens or reply_budget(spec, options)}
    if family.temperature and options.temperature is not None:
        body["temperature"] = options.temperature
    if options.reasoning_effort is not None:
        body["reasoning_effort"] = options.reasoning_effort
    if logprobs and family.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = TOP_LOGPROBS
    wants_schema = options.structured_output if structured is None else structured
    if wants_schema and scale is not None:
        body["response_format"] = verdict_schema(scale)
    body.update(options.extra_body)
    return body


#: Body fields never dropped: without them there is no request.
_REQUIRED = frozenset({"model", "messages"})
#: What takes the place of a refused reply-budget parameter.
_RENAMED = {"max_tokens": "max_completion_tokens", "max_completion_tokens": "max_tokens"}
#: Dropped together: one is no use without the other.
_TOGETHER = {"logprobs": ("logprobs", "top_logprobs"), "top_logprobs": ("logprobs", "top_logprobs")}
_REFUSAL_WORDS = re.compile(r"unsupported|not supported|does not support|not allowed|"
                            r"not permitted|unrecognized|unknown|extra (?:inputs|fields)",
                            re.IGNORECASE)


class LearnedRequests:
    """The parameters one endpoint refused, per model, and the bodies that avoid them.

    An endpoint that answers 400 to an optional parameter (OpenAI's
    ``unsupported_parameter``/``unsupported_value``, or a message naming a body field as
    unsupported) is learned from once: a refused ``max_tokens`` goes out as
    ``max_completion_tokens`` from then on (and the other way round); any other optional
    field (``temperature``, ``logprobs``, ``response_format``, ``reasoning_effort``, an
    ``extra_body`` field) is left out. The answer keeps its cache key: the endpoint would
    never have answered the refused request, so the key has only ever meant this one.
    """

    def __init__(self) -> None:
        self._refused: dict[str, dict[str, str | None]] = {}

    def adapt(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` without the parameters its model's endpoint refused."""
        refused = self._refused.get(body.get("model", ""))
        if not refused or not refused.keys() & body.keys():
            return body
        adapted = dict(body)
        for param, replacement in refused.items():
            if param in adapted:
                value = adapted.pop(param)
                if replacement is not None and replacement not in refused:
                    adapted.setdefault(replacement, value)
        return adapted

    def learn(self, body: dict[str, Any], param: str | None, message: str) -> str | None:
        """Record that ``body``'s endpoint refused a parameter; which one, or ``None``
        when the refusal names no optional parameter of ``body`` (nothing to learn).

        Args:
            body: the refused request body.
            param: the parameter the answer named (``RefusedParameterError.param``).
            message: the answer's message, searched for a body field when ``param`` is
                ``None``.
        """
        if param is None and _REFUSAL_WORDS.search(message):
            param = next((key for key in body if key not in _REQUIRED
                          and re.search(rf"\b{re.escape(key)}\b", message)), None)
        if param is None or param not in body or param in _REQUIRED:
            return None
        refused = self._refused.setdefault(body.get("model", ""), {})
        for name in _TOGETHER.get(param, (param,)):
            refused[name] = _RENAMED.get(name)
        return param

    def retry_body(self, body: dict[str, Any], error: JudgeError,
                   endpoint: str) -> dict[str, Any] | None:
        """The body to send again after ``error`` answered ``body``: without the parameter
        the endpoint refused (learned, with one WARNING); ``None`` when ``error`` is not
        such a refusal."""
        if not isinstance(error, PermanentJudgeError) or error.status_code not in (400, 422):
            return None
        model = str(body.get("model"))
        known = set(self._refused.get(model, {}))
        param = self.learn(body, error.param if isinstance(error, RefusedParameterError)
                           else None, str(error))
        if param is None:
            return None
        if param in known:  # a call sent before the lesson: no second warning
            return self.adapt(body)
        replacement = self._refused.get(model, {}).get(param)
        log.warning("judge %s refuses %r for model %s (%s): %s from now on", endpoint, param,
                    model, error, f"sending {replacement} instead" if replacement
                    else f"leaving {param} out")
        return self.adapt(body)
