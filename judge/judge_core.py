"""The judge call without its I/O: what to send, and what the reply means.

httpx's idea: the logic lives once, and thin shells drive it. The worker's async client,
the in-process sync judge and the benchmark's one-process baseline all build the same
chat-completions body from the same ``JudgeSpec`` and read the reply with the same
functions, so for the same judge answers every path gives the same score.

    spec = judge_spec(settings)                  # what changes the answer (and the cache key)
    rubric = book.rubric_for(spec, item)         # the item's instructions (rewardq.judge.rubrics)
    body = judge_request(spec, rubric, item)     # POST {base_url}/chat/completions
    reply = read_reply(response_bytes)           # text, usage, logprobs, finish reason
    answer = answer_text(reply)                  # after the thinking; CutReplyError if cut
    verdict = judge_verdict(answer, reply.usage, reply.tokens,
                            mode=rubric.score_mode_for(spec), scale=rubric.scale)

The request carries the parameters the judge model takes (``rewardq.judge.judge_request``). In
``logprobs`` mode (G-Eval) it asks for ``top_logprobs`` and the score is the expectation
over the rubric's scale where the judge wrote its score, whatever its tokenizer
(``rewardq.judge.logprob_scores``); a reply without them falls back to the written integer,
flagged ``parsed_fallback``.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from rewardq.broker.errors import CutReplyError, UnparseableReplyError
from rewardq.broker.schemas import GroupSpec, JudgeSpec, JudgeVerdict, ScoreItem, ScoreMode, Usage
from rewardq.broker.settings import Settings
from rewardq.judge.judge_request import TOP_LOGPROBS, request_body
from rewardq.judge.logprob_scores import TokenLogprob, logprob_score
from rewardq.judge.prompts import SCALE_MAX, SCALE_MIN
from rewardq.judge.rollout_view import final_answer
from rewardq.judge.rubrics import Rubric, RubricBook
from rewardq.judge.verdicts import extract_raw_score, normalize

__all__ = ["COMPLETIONS_PATH", "TOP_LOGPROBS", "ChatReply", "TokenLogprob", "answer_text",
           "judge_request", "judge_spec", "judge_verdict", "read_reply"]

#: Where the body is POSTed, relative to the OpenAI-compatible base URL.
COMPLETIONS_PATH = "/chat/completions"
#: A rubric's lowest and highest score.
Scale = tuple[int, int]
DEFAULT_SCALE: Scale = (int(SCALE_MIN), int(SCALE_MAX))


class ChatReply(NamedTuple):
    """What a chat completion says: the first choice's text, the token usage, the first
    choice's per-token logprobs (``None`` when the reply carries none) and why it ended."""

    content: str | None
    usage: Usage | None
    tokens: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None


def judge_spec(settings: Settings, rubrics: RubricBook | None = None) -> JudgeSpec:
    """Everything in ``settings`` that changes the judge's answer: model, prompt version,
    temperature, max tokens, score mode, ensemble, group judging, and the digests of
    ``rubrics`` (the run's rubric book, when it comes from a file). The producer puts it on
    every chunk and fingerprints items with it; the sync judge uses it too, so both can
    never key the cache differently."""
    group = GroupSpec(mode=settings.judge_group_mode, size=settings.judge_group_size) \
        if settings.judge_group_mode is not None else None
    return JudgeSpec(model=settings.judge_model, prompt_version=settings.judge_prompt_version,
                     temperature=settings.judge_temperature,
                     max_tokens=settings.judge_max_tokens,
                     reasoning_effort=settings.judge_reasoning_effort,
                     extra_body=settings.judge_extra_body,
                     judge_options=settings.judge_options,
                     structured_output=settings.judge_structured_output,
                     view=settings.judge_view, view_max_tokens=settings.judge_view_max_tokens,
                     score_mode=settings.judge_score_mode,
                     judges=tuple(settings.judge_ensemble), samples=settings.judge_samples,
                     aggregate=settings.judge_aggregate, group=group,
                     rubrics=rubrics.digests if rubrics is not None else {})


def judge_request(spec: JudgeSpec, rubric: Rubric, item: ScoreItem) -> dict[str, Any]:
    """The chat-completions request body asking the judge to score ``item`` by ``rubric``,
    with the parameters ``spec.model`` takes (``rewardq.judge.judge_request``)."""
    structured = rubric.structured_output if rubric.structured_output is not None else None
    return request_body(spec, rubric.messages(item),
                        logprobs=rubric.score_mode_for(spec) == "logprobs",
                        scale=rubric.scale, structured=structured)


def answer_text(reply: ChatReply, max_tokens: int | None = None) -> str:
    """The judge's final answer in ``reply``: its content after any thinking block.

    Thinking never counts: a ``reasoning_content``/``reasoning`` field is not read, and a
    ``<think>`` (``<thinking>``, ``<reasoning>``) block in the content is skipped.

    Args:
        reply: the chat completion, as :func:`read_reply` read it.
        max_tokens: the call's reply budget, named in the error.

    Raises:
        CutReplyError: the reply was cut by its token limit (``finish_reason: "length"``)
            or its thinking was never closed: the verdict may be missing or a draft.
    """
    content = reply.content or ""
    answer = final_answer(content)
    if reply.finish_reason == "length" or answer is None:
        usage = reply.usage or Usage()
        spent = f"{usage.completion_tokens} completion tokens" + (
            f", {usage.reasoning_tokens} of them reasoning" if usage.reasoning_tokens else "")
        where = "inside its thinking" if answer is None or not answer.strip() else \
            "before the verdict was complete"
        budget = f" (now {max_tokens})" if max_tokens is not None else ""
        raise CutReplyError(
            f"judge reply cut by its token limit {where} ({spent}, finish_reason="
            f"{reply.finish_reason!r}): raise REWARDQ_JUDGE_MAX_TOKENS{budget} or the "
            f"judge's max_tokens in REWARDQ_JUDGE_OPTIONS")
    return answer


def read_reply(body: bytes | str) -> ChatReply:
    """The first choice's message content, the token usage and the first choice's
    ``logprobs.content`` of a chat completion.

    Logprobs that are absent or not in the OpenAI shape read as ``None``: the verdict then
    falls back to the written integer, never fails for them.

    Raises:
        UnparseableReplyError: the body is not a chat-completion JSON object.
    """
    try:
        reply: Any = json.loads(body)
        choices = reply.get("choices") or []
        content = choices[0]["message"].get("content") if choices else None
        finish = choices[0].get("finish_reason") if choices else None
        return ChatReply(content, _usage(reply.get("usage")),
                         _tokens(choices[0].get("logprobs")) if choices else None,
                         finish if isinstance(finish, str) else None)
    except (ValueError, TypeError, LookupError, AttributeError, RecursionError) as exc:
        raise UnparseableReplyError(f"judge reply is not a chat completion: {exc}") from exc


def judge_verdict(content: str | None, usage: Usage | None,
                  tokens: tuple[TokenLogprob, ...] | None = None, *,
                  mode: ScoreMode = "parsed", scale: Scale = DEFAULT_SCALE) -> JudgeVerdict:
    """The verdict in a reply: the score read, clamped and normalized.

    Args:
        content: the reply's text; its integer is the score in ``parsed`` mode and the
            fallback in ``logprobs`` mode.
        usage: the reply's token usage.
        tokens: the reply's per-token logprobs (``ChatReply.tokens``).
        mode: the rubric's score mode; in ``logprobs`` mode the score is
            ``rewardq.judge.logprob_scores.logprob_score`` of ``tokens`` (``logprobs`` or
            ``logprobs_partial``), or the integer (``parsed_fallback``) when they say
            nothing provable about the score.
        scale: the rubric's lowest and highest score: the score is clamped to it and
            mapped to [0, 1].

    Raises:
        UnparseableReplyError: the content holds no readable score.
    """
    raw = extract_raw_score(content)
    if mode == "parsed":
        return JudgeVerdict(score=normalize(raw, scale), raw_score=raw, usage=usage or Usage())
    read = logprob_score(tokens, scale, answer=content) if tokens else None
    if read is None:
        return JudgeVerdict(score=normalize(raw, scale), raw_score=raw, usage=usage or Usage(),
                            score_source="parsed_fallback")
    return JudgeVerdict(score=normalize(read.value, scale), raw_score=read.value,
                        usage=usage or Usage(), score_source=read.source)


def _usage(usage: Any) -> Usage | None:
    if not usage:
        return None
    details = usage.get("completion_tokens_details") or {}
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return Usage(prompt_tokens=usage.get("prompt_tokens") or 0,
                 completion_tokens=usage.get("completion_tokens") or 0,
                 reasoning_tokens=reasoning if isinstance(reasoning, int) else 0)


def _tokens(logprobs: Any) -> tuple[TokenLogprob, ...] | None:
    """``choices[0].logprobs`` as tokens; ``None`` if absent or not the OpenAI shape."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content:
        return None
    tokens = []
    for entry in content:
        token = _token_logprob(entry)
        if token is None:
            return None
        top = entry.get("top_logprobs") or []
        alternatives = [_token_logprob(alt) for alt in top] if isinstance(top, list) else [None]
        tokens.append(TokenLogprob(token[0], token[1],
                                   tuple(a for a in alternatives if a is not None)))
    return tuple(tokens)


def _token_logprob(entry: Any) -> tuple[str, float] | None:
    if not isinstance(entry, dict):
        return None
    token, logprob = entry.get("token"), entry.get("logprob")
    if (not isinstance(token, str) or isinstance(logprob, bool)
            or not isinstance(logprob, int | float)):
        return None
    return token, float(logprob)
