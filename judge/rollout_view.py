"""What the judge is shown of a rollout; pure, no I/O.

A policy's rollout holds its thinking (``<think>…</think>``, ``<thinking>…</thinking>``,
``<reasoning>…</reasoning>``), then its final answer, and often the chat template's
end-of-turn token (OpenRLHF and slime decode with special tokens). The judge grades the
answer, so the producer shows it a *view* of the rollout, taken before anything is
enqueued: only the view travels through Redis and into the cache key.

Views (``Settings.judge_view``, or a rubric's ``view``):

- ``final_answer`` (default): the text after the last closing thinking tag; a rollout
  without thinking tags is all answer. A rollout whose thinking was opened and never
  closed (cut at the policy's length limit) has no final answer. When the prompt ends
  inside an open thinking block (chat templates of R1-style models put ``<think>`` in the
  generation prompt), the rollout starts inside it, so it needs a closing tag too.
- ``full``: the whole rollout, thinking included.

Both drop end-of-turn tokens (:data:`END_OF_TURN_TOKENS`) wherever they stand and the
whitespace around the text, and cap what is left at ``max_tokens`` (one token per
:data:`CHARS_PER_TOKEN` characters): the head and the tail are kept, joined by a marker
that says how many characters were left out. A view with nothing left is no answer:
:func:`rollout_view` returns a :class:`NoAnswer` saying why, and the producer answers the
item ``no_answer`` without a judge call.

The same tag rules read the judge's own reply (:func:`final_answer`): a reasoning judge
that writes its thinking into the content is scored on what follows it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rewardq.broker.schemas import JudgeSpec, ResultStatus, ScoreItem, ScoreResult, View
from rewardq.judge.conversation import prompt_view
from rewardq.judge.rubrics import RubricBook

__all__ = ["CHARS_PER_TOKEN", "END_OF_TURN_TOKENS", "GROUP_NO_ANSWER", "THINKING_TAGS",
           "NoAnswer", "ends_inside_thinking", "final_answer", "rollout_view", "view_items"]

#: The estimate of text length in tokens used wherever rewardq sizes text before a call.
CHARS_PER_TOKEN = 4
#: Opening and closing tags of thinking blocks, as reasoning models write them.
THINKING_TAGS = (("<think>", "</think>"), ("<thinking>", "</thinking>"),
                 ("<reasoning>", "</reasoning>"))
#: Chat templates' end-of-turn and end-of-text tokens (ChatML/Qwen, Llama 3, Llama 2 and
#: Mistral, GPT-2 style, Phi-3, Gemma, DeepSeek, gpt-oss).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>",
                      "<|endoftext|>", "<|end|>", "<end_of_turn>",
                      "<｜end▁of▁sentence｜>", "<|return|>")

_CLOSE = re.compile("|".join(re.escape(close) for _, close in THINKING_TAGS), re.IGNORECASE)
_OPEN = re.compile("|".join(re.escape(open_) for open_, _ in THINKING_TAGS), re.IGNORECASE)
_END_OF_TURN = re.compile("|".join(re.escape(token) for token in END_OF_TURN_TOKENS))
_MARKER = "\n\n[… {omitted} characters of the rollout left out by rewardq …]\n\n"


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """A rollout with nothing to judge, and why (the ``no_answer`` result's error)."""

    reason: str


def rollout_view(response: str, *, view: View = "final_answer", max_tokens: int = 8192,
                 prompt: str = "") -> str | NoAnswer:
    """What the judge is shown of ``response`` under ``view``, capped to ``max_tokens``.

    Args:
        response: the rollout as the policy wrote it.
        view: ``final_answer`` or ``full`` (see the module docstring).
        max_tokens: the most tokens of text shown (head and tail kept beyond it).
        prompt: the rollout's prompt; one that ends inside an open thinking block means
            the rollout starts inside it.

    Returns:
        The text to show, or a :class:`NoAnswer` when there is none.
    """
    text = _END_OF_TURN.sub("", response) if "<" in response else response
    if view == "final_answer":
        answer = final_answer(text, opened=ends_inside_thinking(prompt))
        if answer is None:
            return NoAnswer("the rollout's thinking was never closed (cut at the policy's "
                            "length limit?): it has no final answer to judge")
        text = answer
    text = text.strip()
    if not text:
        return NoAnswer("the rollout is empty" if not response.strip() else
                        "the rollout has no final answer after its thinking")
    return _capped(text, max_tokens * CHARS_PER_TOKEN)


def final_answer(text: str, *, opened: bool = False) -> str | None:
    """``text`` after its last closing thinking tag; ``None`` if thinking was left open.

    Args:
        text: a rollout or a judge's reply.
        opened: ``text`` starts inside a thinking block (its opening tag came before).
    """
    if "<" not in text:
        return None if opened else text
    last_close = None
    for last_close in _CLOSE.finditer(text):  # noqa: B007 - the last match is wanted
        pass
    if last_close is not None:
        rest = text[last_close.end():]
        return None if _OPEN.search(rest) else rest
    return None if opened or _OPEN.search(text) else text


def ends_inside_thinking(prompt: str) -> bool:
    """Whether ``prompt`` ends inside an open thinking block (a generation prompt that
    opens ``<think>``, as R1-style chat templates write it): its rollout starts inside."""
    if "<" not in prompt:
        return False
    tail = prompt[-4096:]
    last_open = None
    for last_open in _OPEN.finditer(tail):  # noqa: B007 - the last match is wanted
        pass
    return last_open is not None and _CLOSE.search(tail, last_open.end()) is None


def _capped(text: str, max_chars: int) -> str:
    """``text`` in at most ``max_chars`` characters, marker included (so a view of a view
    is the same view)."""
    if len(text) <= max_chars:
        return text
    kept = max_chars - len(_MARKER.format(omitted=len(text)))
    head = kept // 3  # the conclusion, which the judge grades, comes last
    tail = kept - head
    return text[:head] + _MARKER.format(omitted=len(text) - head - tail) + text[-tail:]


#: The error of a group member with no answer (group judging answers it on the workers).
GROUP_NO_ANSWER = "the rollout has no final answer (it is empty, or its thinking was never closed)"


def view_items(items: Sequence[ScoreItem], spec: JudgeSpec, rubrics: RubricBook
               ) -> list[ScoreItem | ScoreResult]:
    """Each item as the judge will see it (its response replaced by its view, its prompt
    by :func:`rewardq.judge.conversation.prompt_view`), or its ``no_answer`` result when
    there is nothing to judge.

    With group judging (``spec.group``) a member with nothing to judge still goes to the
    fleet, with an empty response, so that its group completes; the workers answer it
    ``no_answer`` and judge the rest of its group without it.

    Args:
        items: items whose rubric is assigned (``RubricBook.assign``).
        spec: the run's judge spec (``view``, ``view_max_tokens``).
        rubrics: the run's rubrics, whose ``view`` overrides the spec's.
    """
    views: list[ScoreItem | ScoreResult] = []
    for item in items:
        rubric = rubrics.rubrics.get(item.rubric or "")
        view = rubric.view_for(spec) if rubric is not None else spec.view
        shown = rollout_view(item.response, view=view, max_tokens=spec.view_max_tokens,
                             prompt=item.prompt)
        if isinstance(shown, NoAnswer):
            if spec.group is None:
                views.append(ScoreResult.failure(item.id, ResultStatus.NO_ANSWER,
                                                 shown.reason))
                continue
            shown = ""
        update = {"prompt": prompt_view(item.prompt), "response": shown}
        changed = {k: v for k, v in update.items() if v != getattr(item, k)}
        views.append(item.model_copy(update=changed) if changed else item)
    return views
