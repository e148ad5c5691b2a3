"""The local judge's verdicts: deterministic grading from the judge prompt; pure, no I/O.

A real LLM judge is neither free nor reproducible, so the local judge grades by rule,
and the tests of the whole system call :func:`expected_raw_score` to check every score
the workers hand back: whatever the server answers is exactly what these functions say.

Two rubrics, chosen by the first line of the user message that
``rewardq.judge.prompts`` builds (``rewardq-judge v1 correctness`` / ``... quality``):

* **correctness** (a reference answer is given): 10 if the response's
  :func:`final_answer` equals the reference's answer, else 1.
* **quality** (no reference): a heuristic in 2..9, see :func:`quality_score`.

A user message without the rewardq header is graded with the quality heuristic on its
whole text (empty prompt), so any OpenAI client gets a sensible answer and never a crash.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CORRECT_SCORE = 10
INCORRECT_SCORE = 1
QUALITY_MIN = 2
QUALITY_MAX = 9
QUALITY_BASE = 5

_HEADER = re.compile(r"rewardq-judge v\d+ (correctness|quality)\b")
_ANSWER_MARKER = re.compile(r"answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
# A number in prose: optional minus sign (not the dash of a range like "3-5"),
# thousands groups "1,234,567" or plain digits, optional decimals.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_NUMERIC = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_WRAPPERS = " \t\r\n*`$"
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Grade:
    """The judge's verdict: an integer score on the 1-10 scale and a one-line reason."""

    score: int
    reason: str
    #: The whole reply to send instead of ``{"score": ..., "reason": ...}`` (group
    #: prompts answer with their own JSON, see ``rewardq.judge_server.group_grading``).
    reply: str | None = None


@dataclass(frozen=True)
class JudgeRequest:
    """The parts of a rewardq judge prompt; ``rubric`` is ``None`` for a foreign prompt."""

    rubric: str | None
    prompt: str
    response: str
    reference: str | None


def normalize_answer(text: str) -> str:
    """Canonical form of an answer, so that equal answers compare equal as strings.

    Strips whitespace and markdown/LaTeX wrappers (``*``, backticks, ``$``), lowercases,
    drops trailing periods; a number loses its thousands commas and redundant zeros
    (``"1,000.50"`` -> ``"1000.5"``, ``"4.0"`` -> ``"4"``, ``"-0"`` -> ``"0"``).
    """
    previous = None
    s = text.lower()
    while s != previous:
        previous = s
        s = s.strip(_WRAPPERS).rstrip(".")
    if _NUMERIC.fullmatch(s):
        return _canonical_number(s.replace(",", ""))
    return s


def final_answer(text: str) -> str | None:
    """The final answer a response commits to, normalized, or ``None`` if it has none.

    Looked for in order: the content of the last ``\\boxed{...}`` (nested braces
    allowed); the rest of the sentence (up to a newline or ". ") after the last
    "answer is" / "answer:" (any case); the last number in the text. The result goes
    through :func:`normalize_answer`.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        answer = normalize_answer(boxed)
        return answer or None
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        rest = text[markers[-1].end():].split("\n", 1)[0]
        answer = normalize_answer(rest.split(". ", 1)[0])
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    if numbers:
        return normalize_answer(numbers[-1])
    return None


def reference_answer(reference: str) -> str:
    """The answer a reference stands for: its ``\\boxed{...}`` content if any, else all of it.

    Unlike :func:`final_answer`, a reference is not searched for "the last number", since
    a reference like ``"x + 1"`` is the answer itself.
    """
    boxed = _last_boxed(reference)
    return normalize_answer(boxed if boxed is not None else reference)


def quality_score(prompt: str, response: str) -> int:
    """The quality heuristic: a score in 2..9 from the shape of ``response``.

    Starting from 5:

    * +2 if it states an explicit final answer (``\\boxed{}`` or "answer is/answer:"),
      else +1 if it contains any number;
    * +1 if it has 8 to 400 words; -2 if it has fewer than 3; -1 if over 1000;
    * +1 if it spans more than one non-empty line (shows its working);
    * -2 if, with 20 words or more, under half its words are distinct; -3 if under 30%;
    * -3 if it merely repeats the prompt.

    The sum is clamped to 2..9, so a quality score never equals a correctness verdict.
    """
    score = QUALITY_BASE
    if _last_boxed(response) is not None or _ANSWER_MARKER.search(response):
        score += 2
    elif _NUMBER.search(response):
        score += 1
    words = _WORD.findall(response.lower())
    if len(words) < 3:
        score -= 2
    elif len(words) > 1000:
        score -= 1
    elif 8 <= len(words) <= 400:
        score += 1
    if sum(1 for line in response.splitlines() if line.strip()) > 1:
        score += 1
    if len(words) >= 20:
        distinct = len(set(words)) / len(words)
        if distinct < 0.3:
            score -= 3
        elif distinct < 0.5:
            score -= 2
    if prompt.strip() and response.strip() == prompt.strip():
        score -= 3
    return min(max(score, QUALITY_MIN), QUALITY_MAX)


def expected_raw_score(prompt: str, response: str, reference: str | None) -> int:
    """The score (1..10) the local judge gives ``response``; what the server answers.

    Args:
        prompt: the item's prompt.
        response: the response being judged.
        reference: the reference answer (correctness rubric), or ``None`` (quality).
    """
    return grade_item(prompt, response, reference).score


def grade_item(prompt: str, response: str, reference: str | None) -> Grade:
    """:func:`expected_raw_score` with the reason the judge gives for it."""
    if reference is None:
        score = quality_score(prompt, response)
        return Grade(score, f"quality heuristic gives {score}")
    got = final_answer(response)
    want = reference_answer(reference)
    if got is not None and got == want:
        return Grade(CORRECT_SCORE, "final answer matches the reference")
    if got is None:
        return Grade(INCORRECT_SCORE, "the response states no final answer")
    return Grade(INCORRECT_SCORE, "final answer differs from the reference")


def parse_judge_prompt(user_message: str) -> JudgeRequest:
    """Read prompt, reference and response back out of a rewardq judge user message.

    A message whose first line is not a rewardq header, or that lacks a section, comes
    back with ``rubric=None`` and the whole text as the response. The response section
    runs to the *last* end marker, so a response that quotes a marker is still read whole.
    """
    first_line = first_line_of(user_message).strip()
    header = _HEADER.fullmatch(first_line)
    foreign = JudgeRequest(None, "", user_message, None)
    if header is None:
        return foreign
    rubric = header.group(1)
    prompt, pos = section(user_message, "PROMPT", 0)
    if prompt is None:
        return foreign
    reference: str | None = None
    if rubric == "correctness":
        reference, pos = section(user_message, "REFERENCE", pos)
        if reference is None:
            return foreign
    start = user_message.find("<<<RESPONSE>>>\n", pos)
    end = user_message.rfind("\n<<<END RESPONSE>>>")
    if start < 0 or end < start + len("<<<RESPONSE>>>"):
        return foreign
    response = user_message[start + len("<<<RESPONSE>>>\n"):end]
    return JudgeRequest(rubric, prompt, response, reference)


def user_text(messages: Any) -> str:
    """The text of the last ``user`` message, else of all messages joined by newlines.

    Content may be a string or a list of content parts (``{"type": "text", "text": ...}``);
    anything else is ignored rather than raising.
    """
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return "\n".join(content_text(m.get("content")) for m in messages if isinstance(m, dict))


def content_text(content: Any) -> str:
    """The text of one message's ``content`` (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_part_texts(content))
    return ""


def _part_texts(parts: Iterable[Any]) -> Iterable[str]:
    for part in parts:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            yield part["text"]
        elif isinstance(part, str):
            yield part


def first_line_of(text: str) -> str:
    """``text`` up to its first newline, without copying the rest (judge prompts carry
    rollouts of hundreds of thousands of characters)."""
    end = text.find("\n")
    return text if end < 0 else text[:end]


def section(text: str, name: str, pos: int) -> tuple[str | None, int]:
    """The text between ``<<<NAME>>>`` and ``<<<END NAME>>>`` at or after ``pos``."""
    opener = f"<<<{name}>>>\n"
    closer = f"\n<<<END {name}>>>"
    start = text.find(opener, pos)
    if start < 0:
        return None, pos
    start += len(opener)
    end = text.find(closer, start)
    if end < 0:
        return None, pos
    return text[start:end], end + len(closer)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced; ``None`` if there is none."""
    opener = "\\boxed{"
    end = len(text)
    start = text.rfind(opener)
    while start >= 0:
        depth = 0
        for i in range(start + len(opener), end):
            char = text[i]
            if char == "{":
                depth += 1
            elif char == "}":
                if depth == 0:
                    return text[start + len(opener):i]
                depth -= 1
        # Never closed: fall back to the one before it, which (enclosing this one) can
        # only close before this one starts, so each character is scanned once.
        end = start
        start = text.rfind(opener, 0, start)
    return None


def _canonical_number(s: str) -> str:
    """``s`` (digits, optional sign and decimals, no commas) without redundant characters.

    String surgery rather than ``Decimal``: exact for any length, no context precision.
    """
    negative = s.startswith("-")
    whole, _, fraction = s.lstrip("+-").partition(".")
    whole = whole.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    if whole == "0" and not fraction:
        return "0"
    number = f"{whole}.{fraction}" if fraction else whole
    return f"-{number}" if negative else number
