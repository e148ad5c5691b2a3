"""The kinds of judge the local judge plays: what each refuses and how each answers; pure.

A profile (``JudgeConfig.profile``; ``JudgeConfig.model_profiles`` gives a requested
model name a profile of its own, so one server plays an ensemble of different judges)
is modelled on what the provider documents and what
its endpoints are seen to answer, so a client that works against the profile works
against the real judge:

* ``plain`` (the default): a non-reasoning judge (GPT-4.1/4o-class): accepts every
  common parameter and answers its JSON verdict at once; budgets are not enforced.
* ``openai-reasoning``: a GPT-5.x / o-series model on chat completions (OpenAI's API
  reference for ``/v1/chat/completions`` and its reasoning guide). Refuses, with the
  API's 400 bodies (:func:`check_openai_reasoning`): ``max_tokens`` ("Use
  'max_completion_tokens' instead", ``unsupported_parameter``); a ``temperature`` or
  ``top_p`` other than 1 (``unsupported_value``); ``logprobs: true`` and
  ``top_logprobs``, ``logit_bias``, ``frequency_penalty``, ``presence_penalty``
  (``unsupported_parameter``); a ``reasoning_effort`` outside minimal/low/medium/high;
  any parameter the API does not know (``unknown_parameter``: e.g. vLLM's ``top_k`` or
  ``chat_template_kwargs``). Accepts ``max_completion_tokens`` and ``reasoning_effort``.
  Each answer spends ``JudgeConfig.reasoning_tokens[effort]`` hidden reasoning tokens
  (effort ``medium`` when not given) before its verdict, all counted in
  ``max_completion_tokens``: when the budget does not cover reasoning plus verdict the
  reply is empty, ``finish_reason: "length"``, every token spent on reasoning.
  ``usage.completion_tokens`` includes the reasoning and
  ``usage.completion_tokens_details.reasoning_tokens`` reports it; the reasoning never
  appears in the reply.
* ``think-in-content``: an open reasoning model (DeepSeek-R1 distill, QwQ, Qwen3 in
  thinking mode) on vLLM or SGLang *without* a reasoning parser: ``content`` is
  ``<think>\\n`` + the thinking + ``\\n</think>\\n\\n`` + the verdict (without the
  opening ``<think>\\n`` under ``JudgeConfig.think_tag_in_prompt``: DeepSeek-R1's chat
  template ends the prompt with it, so the model's output only closes the block). The thinking
  opens with a *draft* verdict written as JSON whose score is the opposite end of the
  scale (``11 - score``; a group draft reverses the grades or the winner), then
  retracts it, so a reader that scores the first JSON it finds is caught.
  ``JudgeConfig.thinking_tokens`` sets the thinking's length.
* ``reasoning-field``: the same models *with* a reasoning parser (vLLM's Reasoning
  Outputs): the thinking, draft included, goes to ``message.reasoning_content`` and
  ``message.reasoning`` (the old and the new field name), ``content`` holds the verdict
  (``null`` while the thinking was cut), and
  ``usage.completion_tokens_details.reasoning_tokens`` counts the thinking.
* ``digit-logprobs``: a model whose tokenizer writes numbers digit by digit (Qwen,
  Mistral): answers like ``plain``, but its logprobs spread the judge's intended
  distribution over the score's digits (``rewardq.judge_server.digit_logprobs``).

For ``think-in-content`` and ``reasoning-field`` a token is 4 characters of generated
text, rounded up, and the budget is ``max_completion_tokens`` or else ``max_tokens``
(vLLM's rule; none: unlimited): a reply over it is cut after ``4 * budget`` characters
with ``finish_reason: "length"`` (a small budget cuts inside the thinking), and
``usage.completion_tokens`` is what was generated. A request with
``chat_template_kwargs: {"enable_thinking": false}`` gets no thinking (Qwen3's switch).

Every profile honours ``response_format: {"type": "json_schema", ...}`` by answering
exactly the JSON object the schema asks for (``{"score": 7}``, no reason, no prose;
after the thinking, as a reasoning model constrained only once it has thought). With
``JudgeConfig.refuse_response_format`` a body carrying a ``response_format`` other than
``text`` gets the 400 that OpenAI answers for a model without structured outputs.

Asked for logprobs, ``plain``, ``think-in-content`` and ``reasoning-field`` answer them
over every generated token (the thinking's included, as an engine reports them), with a
distribution peaked at the grade at the verdict's score and one peaked at the draft's
score inside the thinking.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from rewardq.judge_server.config import DEFAULT_REASONING_EFFORT, REASONING_EFFORTS, JudgeConfig
from rewardq.judge_server.digit_logprobs import digit_logprobs_content, intended_distribution
from rewardq.judge_server.grading import Grade
from rewardq.judge_server.protocol import (
    MALFORMED_REPLY,
    ChatRequest,
    count_tokens,
    logprobs_content,
    reply_content,
    reply_tokens,
    score_logprobs,
)

THINK_OPEN = "<think>\n"
THINK_CLOSE = "\n</think>\n\n"
#: Characters per token of generated text in the reasoning profiles (rounded up).
CHARS_PER_TOKEN = 4
#: Every top-level parameter OpenAI's chat-completions API knows; the
#: ``openai-reasoning`` profile refuses any other as ``unknown_parameter``.
OPENAI_CHAT_PARAMETERS = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions",
    "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
    "modalities", "n", "parallel_tool_calls", "prediction", "presence_penalty",
    "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
    "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p",
    "user", "verbosity", "web_search_options",
})
#: Parameters a reasoning model refuses whatever their value.
_REFUSED_PARAMETERS = ("logit_bias", "frequency_penalty", "presence_penalty")
#: Parameters a reasoning model takes only at their default, 1.
_DEFAULT_ONLY = ("temperature", "top_p")
_STRUCTURED_OUTPUTS_GUIDE = "https://platform.openai.com/docs/guides/structured-outputs"


@dataclass(frozen=True)
class Refusal:
    """An API error a profile answers instead of a completion."""

    status: int
    type: str
    param: str | None
    code: str | None
    message: str

    def body(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(slots=True)
class Reply:
    """A completion as a profile shapes it."""

    content: str | None
    completion_tokens: int
    finish_reason: str = "stop"
    #: Reasoning tokens inside ``completion_tokens`` (0 when the judge did not reason).
    reasoning_tokens: int = 0
    message_extra: dict[str, Any] | None = None
    usage_extra: dict[str, Any] | None = None
    logprobs: list[dict[str, Any]] | None = None

    @property
    def complete(self) -> bool:
        """Whether the verdict was delivered whole (a cut reply judges nothing)."""
        return self.finish_reason == "stop"


def check_request(chat: ChatRequest, config: JudgeConfig) -> Refusal | None:
    """The 400 the played judge answers to ``chat``, or ``None`` when it accepts it."""
    body = chat.body
    profile = config.profile_for(chat.model)
    if profile == "openai-reasoning":
        refusal = check_openai_reasoning(body)
        if refusal is not None:
            return refusal
    elif profile in ("think-in-content", "reasoning-field"):
        for name in ("max_completion_tokens", "max_tokens"):
            value = body.get(name)
            if value is not None and not (_is_int(value) and value >= 1):
                return Refusal(400, "BadRequestError", name, None,
                               f"{name} must be at least 1, got {value}.")
    response_format = body.get("response_format")
    if config.refuse_response_format and response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind != "text":
            return Refusal(400, "invalid_request_error", "response_format", None,
                           f"Invalid parameter: 'response_format' of type '{kind}' is not "
                           "supported with this model. Learn more about supported models "
                           f"at the Structured Outputs guide: {_STRUCTURED_OUTPUTS_GUIDE}")
    return None


def check_openai_reasoning(body: dict[str, Any]) -> Refusal | None:
    """What a GPT-5.x / o-series model on chat completions refuses in ``body``, worded
    as the API words it; ``None`` when it accepts the body."""
    for name in body:
        if name not in OPENAI_CHAT_PARAMETERS:
            return _invalid(name, "unknown_parameter", f"Unknown parameter: '{name}'.")
    if body.get("max_tokens") is not None:
        return _invalid("max_tokens", "unsupported_parameter",
                        "Unsupported parameter: 'max_tokens' is not supported with this "
                        "model. Use 'max_completion_tokens' instead.")
    if body.get("logprobs") is True:
        return _unsupported_parameter("logprobs")
    if body.get("top_logprobs") is not None:
        return _unsupported_parameter("top_logprobs")
    for name in _REFUSED_PARAMETERS:
        if body.get(name) is not None:
            return _unsupported_parameter(name)
    for name in _DEFAULT_ONLY:
        value = body.get(name)
        if value is not None and not (_is_number(value) and value == 1):
            return _invalid(name, "unsupported_value",
                            f"Unsupported value: '{name}' does not support {value!r} with "
                            "this model. Only the default (1) value is supported.")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        supported = ", ".join(f"'{e}'" for e in REASONING_EFFORTS[:-1])
        return _invalid("reasoning_effort", "unsupported_value",
                        f"Unsupported value: 'reasoning_effort' does not support {effort!r} "
                        f"with this model. Supported values are: {supported}, and "
                        f"'{REASONING_EFFORTS[-1]}'.")
    budget = body.get("max_completion_tokens")
    if budget is not None and not (_is_int(budget) and budget >= 1):
        return _invalid("max_completion_tokens", "integer_below_min_value",
                        "Invalid 'max_completion_tokens': integer below minimum value. "
                        f"Expected a value >= 1, but got {budget!r} instead.")
    return None


def answer(chat: ChatRequest, grade: Grade | None, config: JudgeConfig,
           spread: float) -> Reply:
    """The reply the played judge gives ``chat`` graded ``grade`` (``None``: a
    ``malformed`` fault, a reply without a verdict).

    Args:
        chat: the request (already accepted by :func:`check_request`).
        grade: the verdict, offsets applied.
        config: the judge's knobs.
        spread: the spread of the score's logprob distribution for this prompt.
    """
    verdict = MALFORMED_REPLY if grade is None else verdict_text(
        grade, chat.body.get("response_format"))
    profile = config.profile_for(chat.model)
    if profile == "openai-reasoning":
        return _openai_reasoning(chat, verdict, config)
    if profile in ("think-in-content", "reasoning-field"):
        return _thinking(chat, grade, verdict, config, spread, profile)
    logprobs = None
    if config.logprobs and chat.top_logprobs is not None:
        score = None if grade is None else grade.score
        if profile == "digit-logprobs":
            dist = {} if grade is None or grade.reply is not None else intended_distribution(
                grade.score, config.digit_confidence, config.digit_neighbour)
            logprobs = digit_logprobs_content(verdict, score if dist else None, dist,
                                              chat.top_logprobs)
        else:
            logprobs = logprobs_content(verdict, score, spread, chat.top_logprobs)
    return Reply(verdict, count_tokens(verdict), logprobs=logprobs)


def verdict_text(grade: Grade, response_format: Any) -> str:
    """The verdict as the judge writes it: its JSON with a reason, or under a
    ``json_schema`` response format exactly the object the schema asks for."""
    if not (isinstance(response_format, dict) and response_format.get("type") == "json_schema"):
        return grade.reply or reply_content(grade)
    fields = _verdict_fields(grade)
    fields.pop("reason", None)
    wanted = _schema_properties(response_format)
    if wanted and wanted & fields.keys():
        fields = {key: value for key, value in fields.items() if key in wanted}
    return json.dumps(fields)


def draft_verdict(grade: Grade) -> str:
    """The draft a thinking judge writes first and then retracts: the verdict with the
    scale reversed (``11 - score``), a group's grades reversed, a pairwise winner
    swapped (a tie drafted as ``"A"``)."""
    fields = _verdict_fields(grade)
    if "scores" in fields and isinstance(fields["scores"], dict):
        return json.dumps({"scores": {label: _reverse(score)
                                      for label, score in fields["scores"].items()}})
    if "winner" in fields:
        swapped = {"A": "B", "B": "A"}.get(fields["winner"], "A")
        return json.dumps({"winner": swapped})
    return json.dumps({"score": _reverse(grade.score)})


def thinking_text(draft: str, tokens: int) -> str:
    """The thinking: the draft verdict first, filler prose, then its retraction; padded
    to ``tokens * CHARS_PER_TOKEN`` characters (never shorter than draft + retraction)."""
    head = f"Let me grade this response against the rubric. A first reading gives a draft verdict: {draft}.\n"  # noqa: E501
    tail = ("\nChecking the draft against the response once more, it does not hold: "
            "the final verdict differs from the draft.")
    room = tokens * CHARS_PER_TOKEN - len(head) - len(tail)
    filler = ""
    if room > 0:
        sentence = "I go through the response step by step and compare it with the prompt. "
        filler = (sentence * (room // len(sentence) + 1))[:room]
    return head + filler + tail


def generated_tokens(text: str) -> int:
    """Tokens of generated text in the reasoning profiles: 4 characters each, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


def budget_of(body: dict[str, Any]) -> int | None:
    """The completion budget a vLLM-style server honours: ``max_completion_tokens`` or
    else ``max_tokens``; ``None`` when neither is set."""
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return value if _is_int(value) else None


def thinking_enabled(body: dict[str, Any]) -> bool:
    """False when ``chat_template_kwargs`` switches thinking off (``enable_thinking`` or
    ``thinking`` false), as Qwen3's and DeepSeek-V3.1's chat templates do."""
    kwargs = body.get("chat_template_kwargs")
    if not isinstance(kwargs, dict):
        return True
    return kwargs.get("enable_thinking", True) is not False and kwargs.get(
        "thinking", True) is not False


def _openai_reasoning(chat: ChatRequest, verdict: str, config: JudgeConfig) -> Reply:
    effort = chat.body.get("reasoning_effort") or DEFAULT_REASONING_EFFORT
    reasoning = config.reasoning_tokens_for(effort)
    answer_tokens = count_tokens(verdict)
    budget = chat.body.get("max_completion_tokens")
    content, finish = verdict, "stop"
    if budget is not None and reasoning + answer_tokens > budget:
        content, finish, reasoning, answer_tokens = "", "length", budget, 0
    return Reply(content, reasoning + answer_tokens, finish, reasoning,
                 message_extra={"annotations": []},
                 usage_extra=_usage_details(reasoning, openai=True))


def _thinking(chat: ChatRequest, grade: Grade | None, verdict: str, config: JudgeConfig,
              spread: float, profile: str) -> Reply:
    body = chat.body
    thinking = None
    if grade is not None and thinking_enabled(body):
        thinking = thinking_text(draft_verdict(grade), config.thinking_tokens)
    # An R1-style chat template ends the prompt with "<think>\n": the model never writes it.
    opener = "" if config.think_tag_in_prompt else THINK_OPEN
    prefix = "" if thinking is None else opener + thinking + THINK_CLOSE
    generated = prefix + verdict
    budget = budget_of(body)
    finish = "stop"
    if budget is not None and generated_tokens(generated) > budget:
        generated, finish = generated[:budget * CHARS_PER_TOKEN], "length"
    completion = generated_tokens(generated)
    logprobs = None
    if config.logprobs and chat.top_logprobs is not None:
        marks = []
        if grade is not None and grade.reply is None:
            if thinking is not None:
                draft_at = len(opener) + thinking.find('{"score": ') + len('{"score": ')
                marks.append((draft_at, _reverse(grade.score)))
            verdict_score_at = verdict.find('"score": ')
            if verdict_score_at >= 0:
                marks.append((len(prefix) + verdict_score_at + len('"score": '), grade.score))
        logprobs = marked_logprobs(generated, marks, spread, chat.top_logprobs)
    if profile == "think-in-content":
        return Reply(generated, completion, finish, logprobs=logprobs)
    reasoning_text, content = _split_reasoning(generated, thinking is not None, opener)
    reasoning = 0
    if thinking is not None:
        reasoning = min(completion, generated_tokens(opener + thinking + THINK_CLOSE))
    return Reply(content, completion, finish, reasoning,
                 message_extra={"reasoning_content": reasoning_text, "reasoning": reasoning_text},
                 usage_extra=_usage_details(reasoning, openai=False), logprobs=logprobs)


def _split_reasoning(generated: str, thought: bool,
                     opener: str) -> tuple[str | None, str | None]:
    """(reasoning, content) as a reasoning parser splits the generated text: no closing
    tag yet means everything so far is reasoning and there is no content."""
    if not thought:
        return None, generated or None
    end = generated.find("</think>")
    if end < 0:
        opened = generated[len(opener):] if generated.startswith(opener) else ""
        return opened, None
    reasoning = generated[len(opener):end].removesuffix("\n")
    return reasoning, generated[end + len("</think>"):].lstrip() or None


def marked_logprobs(content: str, marks: list[tuple[int, int]], spread: float,
                    top_logprobs: int) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content`` over ``content``: certain tokens, except the score
    token starting at each ``(offset, score)`` mark, whose alternatives are
    :func:`rewardq.judge_server.protocol.score_logprobs` peaked at that score."""
    at = dict(marks)
    entries = []
    offset = 0
    for token in reply_tokens(content):
        score = at.get(offset)
        if score is not None and token == str(score):
            ranked = sorted(score_logprobs(score, spread).items(), key=lambda kv: -kv[1])
            logprob = dict(ranked)[score]
            top = [_token_entry(str(k), lp) for k, lp in ranked[:top_logprobs]]
        else:
            logprob, top = 0.0, [_token_entry(token, 0.0)][:top_logprobs]
        entries.append({**_token_entry(token, logprob), "top_logprobs": top})
        offset += len(token)
    return entries


def _verdict_fields(grade: Grade) -> dict[str, Any]:
    if grade.reply is None:
        return {"score": grade.score, "reason": grade.reason}
    try:
        fields = json.loads(grade.reply)
    except ValueError:
        fields = None
    return fields if isinstance(fields, dict) else {"score": grade.score}


def _schema_properties(response_format: dict[str, Any]) -> set[str]:
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    properties = schema.get("properties") if isinstance(schema, dict) else None
    return set(properties) if isinstance(properties, dict) else set()


def _usage_details(reasoning: int, *, openai: bool) -> dict[str, Any]:
    details: dict[str, Any] = {"reasoning_tokens": reasoning}
    if openai:
        details.update(audio_tokens=0, accepted_prediction_tokens=0,
                       rejected_prediction_tokens=0)
        return {"completion_tokens_details": details,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0}}
    return {"completion_tokens_details": details}


def _reverse(score: Any) -> Any:
    return 11 - score if _is_int(score) and 1 <= score <= 10 else score


def _invalid(param: str, code: str, message: str) -> Refusal:
    return Refusal(400, "invalid_request_error", param, code, message)


def _unsupported_parameter(name: str) -> Refusal:
    return _invalid(name, "unsupported_parameter",
                    f"Unsupported parameter: '{name}' is not supported with this model.")


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
