"""Group judging's prompts and reply parsing; pure, no I/O.

A GRPO group (the items sharing a ``uid``) is judged relative to itself
(``JudgeSpec.group``):

- **listwise** (RULER-like): one call shows the judge every response of the group,
  labelled ``A``, ``B``, ... in a shuffled but deterministic order
  (:func:`presentation_order`), and asks for a 1-10 score per label; the judge replies
  ``{"scores": {"A": 7, "B": 3, ...}}``;
- **pairwise**: one call per ordered pair shows two responses, ``A`` (first) and ``B``
  (second), and asks which is better; the judge replies ``{"winner": "A" | "B" | "tie"}``.
  The worker asks about every pair in both orders, so a judge that prefers whatever it
  reads first (position bias) cannot favour a member.

Like ``rewardq.judge.prompts``, every user message names its kind on its first line
(``rewardq-group v1 listwise`` / ``... pairwise``) and carries its sections between
``<<<NAME>>>`` / ``<<<END NAME>>>`` markers (``<<<RESPONSE A>>>`` ...), so the local judge
can read it back.

    order = presentation_order(group_key, members)          # who is A, B, ...
    body = listwise_request(spec, prompt, reference, [responses in that order])
    scores = parse_listwise(reply_content, labels(len(order)))   # label -> raw 1-10
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from rewardq.broker.errors import UnparseableReplyError
from rewardq.broker.schemas import JudgeSpec
from rewardq.judge.judge_request import reply_budget, request_body
from rewardq.judge.prompts import SCALE_MAX, SCALE_MIN

__all__ = ["GROUP_PROMPT_VERSION", "Winner", "labels", "listwise_messages",
           "listwise_request", "pairwise_messages", "pairwise_request", "parse_listwise",
           "parse_pairwise", "presentation_order"]

#: The version on the first line of the group prompts (changing the wording bumps it).
GROUP_PROMPT_VERSION = "v1"
#: A pairwise verdict: the first response shown, the second, or neither.
Winner = Literal["A", "B", "tie"]

SYSTEM_GROUP_V1 = (
    "You are a strict, consistent grader comparing answers that another model produced for "
    "the same prompt. Judge each answer on its merits, not on the order it is shown in. "
    "Reply with a single JSON object and nothing else."
)

_LISTWISE_HEAD = """rewardq-group {version} listwise
Below are {n} candidate RESPONSES to the same PROMPT, labelled {first} to {last}.
{task}
Score every response from 1 (useless or wrong) to 10 (excellent and correct); equally good
responses get equal scores.
Reply with JSON only: {{"scores": {{{example}}}, "reason": "<one short sentence>"}}
"""

_PAIRWISE_HEAD = """rewardq-group {version} pairwise
Below are two candidate RESPONSES to the same PROMPT, labelled A and B.
{task}
Decide which response is better. Say "tie" if they are equally good.
Reply with JSON only: {{"winner": "A" | "B" | "tie", "reason": "<one short sentence>"}}
"""

_TASK_REFERENCE = ("Judge whether each response reaches the same final answer as the "
                   "REFERENCE answer; a response that does is better than one that does not.")
_TASK_QUALITY = ("Judge helpfulness, correctness, clarity and concision.")

_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
_WINNERS: dict[str, Winner] = {"a": "A", "b": "B", "tie": "tie", "draw": "tie",
                               "equal": "tie", "none": "tie"}


def labels(n: int) -> list[str]:
    """The labels of ``n`` responses: ``A`` .. ``Z``, then ``AA``, ``AB`` ... (bijective)."""
    out = []
    for i in range(n):
        label, k = "", i + 1
        while k:
            k, rest = divmod(k - 1, 26)
            label = chr(ord("A") + rest) + label
        out.append(label)
    return out


def presentation_order(group_key: str, members: Iterable[str]) -> list[str]:
    """``members`` in the order the judge sees them: shuffled, but the same for every
    process and every retry (sorted by a hash of the group and the member), so arrival
    order never decides who is shown first."""
    return sorted(set(members),
                  key=lambda m: hashlib.sha256(f"{group_key}\x00{m}".encode()).hexdigest())


def listwise_messages(prompt: str, reference: str | None,
                      responses: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking for a score per response of one group (labelled in order).

    Raises:
        ValueError: fewer than one response.
    """
    if not responses:
        raise ValueError("a listwise prompt needs at least one response")
    names = labels(len(responses))
    head = _LISTWISE_HEAD.format(
        version=GROUP_PROMPT_VERSION, n=len(responses), first=names[0], last=names[-1],
        task=_TASK_REFERENCE if reference is not None else _TASK_QUALITY,
        example=", ".join(f'"{name}": <integer 1-10>' for name in names[:3])
        + (", ..." if len(names) > 3 else ""))
    return _messages(head, prompt, reference, zip(names, responses, strict=True))


def pairwise_messages(prompt: str, reference: str | None, first: str,
                      second: str) -> list[dict[str, str]]:
    """Chat messages asking which of two responses is better; ``first`` is shown as A."""
    head = _PAIRWISE_HEAD.format(version=GROUP_PROMPT_VERSION,
                                 task=_TASK_REFERENCE if reference is not None
                                 else _TASK_QUALITY)
    return _messages(head, prompt, reference, (("A", first), ("B", second)))


def listwise_request(spec: JudgeSpec, prompt: str, reference: str | None,
                     responses: Sequence[str]) -> dict[str, Any]:
    """The chat-completions body of one listwise call (``max_tokens`` grown with the
    group: a score per label must fit)."""
    return _body(spec, listwise_messages(prompt, reference, responses),
                 listwise_max_tokens(spec, len(responses)))


def pairwise_request(spec: JudgeSpec, prompt: str, reference: str | None, first: str,
                     second: str) -> dict[str, Any]:
    """The chat-completions body of one pairwise call, ``first`` shown as A."""
    return _body(spec, pairwise_messages(prompt, reference, first, second), reply_budget(spec))


def listwise_max_tokens(spec: JudgeSpec, n: int) -> int:
    """The reply budget of a listwise call over ``n`` responses: the judge's
    (``rewardq.judge.judge_request.reply_budget``), or more when ``n`` scores (about 6 tokens each)
    and a reason would not fit."""
    return max(reply_budget(spec), 32 + 6 * n)


def parse_listwise(content: str | None, names: Sequence[str]) -> dict[str, float]:
    """The raw score (1-10, clamped) the judge gave each label in ``names``.

    Reads ``{"scores": {"A": 7, ...}}``: the whole reply as JSON, else the outermost
    ``{...}`` in it (a reply wrapped in prose or a code fence). Scores may be numbers or
    numeric strings; labels are matched without regard to case or surrounding spaces.

    Raises:
        UnparseableReplyError: no such object, a label missing, or a score that is not a
            finite number.
    """
    data = _json_object(content, "scores")
    scores = data["scores"]
    if not isinstance(scores, dict):
        raise UnparseableReplyError(f"'scores' is not an object: {_short(content)}")
    by_label = {str(k).strip().upper(): v for k, v in scores.items()}
    out = {}
    for name in names:
        if name not in by_label:
            raise UnparseableReplyError(f"no score for response {name}: {_short(content)}")
        value = _number(by_label[name])
        if value is None:
            raise UnparseableReplyError(
                f"score of response {name} is not a finite number: {_short(content)}")
        out[name] = min(max(value, SCALE_MIN), SCALE_MAX)
    return out


def parse_pairwise(content: str | None) -> Winner:
    """Which response the judge preferred: ``"A"`` (shown first), ``"B"`` or ``"tie"``.

    Reads ``{"winner": ...}`` as :func:`parse_listwise` reads its object; ``"draw"``,
    ``"equal"`` and ``"none"`` (any case) mean a tie.

    Raises:
        UnparseableReplyError: no such object, or a winner that is none of these.
    """
    data = _json_object(content, "winner")
    winner = data["winner"]
    found = _WINNERS.get(winner.strip().lower()) if isinstance(winner, str) else None
    if found is None:
        raise UnparseableReplyError(f"winner is not A, B or tie: {_short(content)}")
    return found


def _messages(head: str, prompt: str, reference: str | None,
              responses: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    parts = [head, f"<<<PROMPT>>>\n{prompt}\n<<<END PROMPT>>>"]
    if reference is not None:
        parts.append(f"<<<REFERENCE>>>\n{reference}\n<<<END REFERENCE>>>")
    parts.extend(f"<<<RESPONSE {name}>>>\n{text}\n<<<END RESPONSE {name}>>>"
                 for name, text in responses)
    return [{"role": "system", "content": SYSTEM_GROUP_V1},
            {"role": "user", "content": "\n".join(parts)}]


def _body(spec: JudgeSpec, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    # No logprobs and no single-score schema: a group verdict is read from the written JSON
    # whatever score_mode says.
    return request_body(spec, messages, max_tokens=max_tokens, structured=False)


def _json_object(content: str | None, key: str) -> dict[str, Any]:
    if not content or not content.strip():
        raise UnparseableReplyError("judge reply is empty")
    text = content.strip()
    match = _OBJECT.search(text)
    for candidate in (text, match.group(0) if match else None):
        if candidate is None:
            continue
        try:
            data = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        if isinstance(data, dict) and key in data:
            return data
    raise UnparseableReplyError(f"no JSON object with {key!r} in judge reply: {_short(text)}")


def _number(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _short(content: str | None) -> str:
    return repr((content or "")[:200])
