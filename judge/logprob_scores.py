"""The score a judge meant, read from its reply's logprobs (G-Eval); pure, no I/O.

In ``logprobs`` mode the judge is asked for ``top_logprobs`` and its score is the
expectation over the rubric's scale of the probabilities it gave the numbers it could have
written where it wrote its score. Tokenizers write numbers differently, and the reader
handles each:

- whole-number tokens: ``"10"`` is one token;
- digit by digit (Qwen2/2.5/3 and the R1 distills built on Qwen, Mistral, Gemma): ``"1"``,
  ``"0"`` for 10;
- digit runs cut into chunks of up to three digits (Llama 3, DeepSeek-V3, OpenAI's
  tokenizers): ``"100"`` is one token, ``"1000"`` is ``"100"``, ``"0"``;
- a leading space on the first token (``" 7"``), counted as ``"7"``.

    score = logprob_score(tokens, scale=(1, 10))  # LogprobScore | None

**Where the score is.** In the final answer only (``rewardq.judge.rollout_view.final_answer``):
the text after the last closing thinking tag (``</think>``, ``</thinking>``,
``</reasoning>``), so a draft verdict inside the thinking is never read; a thinking block
left open means there is no final answer, and no score. Given the final answer the caller
read from the reply's content (``answer=``), the reader looks from where the tokens' text
holds it, so thinking whose tags the token texts lack is never read either. In the
answer, the score is the
number written as the value of the first ``"score"`` key (``"score": 7`` or
``"score": "7"``); an answer without that key is a bare reply, and its score is the first
number in it that is on the scale.

**The tree of digits.** Each position of a number offers alternatives, each with its
probability given what was written before it. An alternative is *proved* to mean the
scale value ``v`` when nothing else on the scale can be written through it:

- it ends the number: it holds non-digits after its digits (``"7,"``), or, after the
  first digit, it is no digit at all (a ``","`` after ``"1"`` means the number was 1);
- one value on the scale only begins with the digits so far (``"7"`` on 1-10 is 7, and
  ``"1"`` on 95-100 is 100): a number is taken to stop where the scale does, a judge
  writing off its scale is not modelled;
- the tokenizer is seen to keep digits together (some token of the final answer, written
  or offered, is two or more digits) and the alternative has fewer than three digits:
  such a tokenizer writes a number's digits in chunks of three, so a shorter chunk ends
  it (Llama 3's ``"1"`` beside its ``"10"`` is the number 1);
- it is the digit the judge wrote, and the next position's alternatives split its
  probability further, read the same way: p(10) = p("1") * p("0" | "1"), and the rest of
  "1"'s probability goes to 1 and any other value its continuations prove.

Values off the scale (a ``"15"`` on 1-10, a word) are left out, and the rest renormalized,
as are tokens not listed among the ``top_logprobs``. A position without alternatives counts
its own token with probability 1, and the token written is counted even where the list
leaves it out.

**The 1-versus-10 ambiguity.** On a digit-by-digit tokenizer, an alternative ``"1"`` that the
judge did *not* write is the probability of 1 *and* of 10 (on 1-100, a ``"9"`` is 9 and
90-99), and nothing in the reply says how it splits: the next position's alternatives are
conditioned on the digit that was written. That probability is *unresolved*: it is left
out, the expectation is taken over the proved values, and the score says so with
``source="logprobs_partial"``. The expectation left out can move the score by at most the
unresolved share times the scale's span, so a share of at most :data:`NEGLIGIBLE_SHARE`
(at most 0.01 of a point on any scale up to 0-100) still reads as ``logprobs``; a share
over :data:`PARTIAL_LIMIT` (most of the judge's probability) gives no score at all
(``None``), and the caller falls back to the integer written, flagged. A score is never
silently wrong.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rewardq.judge.rollout_view import final_answer

__all__ = ["MAX_DIGIT_CHUNK", "NEGLIGIBLE_SHARE", "PARTIAL_LIMIT", "LogprobScore",
           "ScoreDistribution", "TokenLogprob", "logprob_score", "score_distribution"]

#: An unresolved share above this (most of the judge's probability on the scale) gives no
#: score: the caller uses the written integer, flagged as a fallback.
PARTIAL_LIMIT = 0.5
#: An unresolved share at most this moves the score by at most this fraction of the
#: scale's span, within what the ``top_logprobs`` list itself leaves out: read as exact.
NEGLIGIBLE_SHARE = 1e-4
#: The most digits a tokenizer that keeps digits together puts in one token.
MAX_DIGIT_CHUNK = 3

Scale = tuple[int, int]
LogprobSource = Literal["logprobs", "logprobs_partial"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: its text, its logprob and the ``top_logprobs`` alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class LogprobScore:
    """The expected score on the rubric's scale (not normalized), and how much it covers:
    ``logprobs`` all the judge's probability on the scale, ``logprobs_partial`` the part
    that could be attributed to one value (see the module docstring)."""

    value: float
    source: LogprobSource


@dataclass(frozen=True, slots=True)
class ScoreDistribution:
    """What the logprobs say about the score: ``proved`` maps each scale value proved to
    its probability, ``unresolved`` is the probability that may belong to more than one
    value; together they sum to 1."""

    proved: dict[int, float]
    unresolved: float


def logprob_score(tokens: Sequence[TokenLogprob], scale: Scale, *,
                  answer: str | None = None) -> LogprobScore | None:
    """The expected score where the judge wrote it, over the proved values of ``scale``.

    Args:
        tokens: the reply's tokens with their ``top_logprobs`` alternatives.
        scale: the rubric's lowest and highest score, ``0 <= low < high``.
        answer: the reply's final answer as read from its content, if known: the score is
            then looked for from its last occurrence in the tokens' text, so thinking the
            token texts carry without its tags (a server that drops them, a reasoning
            channel) is never read. Where the tokens do not hold it, the thinking tags
            decide (the module docstring).

    Returns:
        The expectation, ``source="logprobs"`` when the unresolved share is at most
        :data:`NEGLIGIBLE_SHARE`, else ``logprobs_partial``; ``None`` when no score can be
        read (no final answer, no number where the score is, nothing on the scale there)
        or the unresolved share exceeds :data:`PARTIAL_LIMIT`.

    Raises:
        ValueError: ``scale`` is not ``(low, high)`` with ``0 <= low < high``.
    """
    distribution = score_distribution(tokens, scale, answer=answer)
    if distribution is None or distribution.unresolved > PARTIAL_LIMIT:
        return None
    proved = distribution.proved
    value = math.fsum(k * p for k, p in proved.items()) / math.fsum(proved.values())
    source: LogprobSource = ("logprobs" if distribution.unresolved <= NEGLIGIBLE_SHARE
                           else "logprobs_partial")
    return LogprobScore(value=min(max(value, scale[0]), scale[1]), source=source)


def score_distribution(tokens: Sequence[TokenLogprob], scale: Scale, *,
                       answer: str | None = None) -> ScoreDistribution | None:
    """The probabilities of the scale values where the judge wrote its score.

    ``None`` when there is no final answer, no number where the score is, or no
    probability on the scale there. Arguments as :func:`logprob_score`.
    """
    low, high = scale
    if not 0 <= low < high:
        raise ValueError(f"scale must be (low, high) with 0 <= low < high, got {scale!r}")
    text = "".join(t.token for t in tokens)
    answer_at = text.rfind(answer.strip()) if answer is not None and answer.strip() else -1
    if answer_at < 0:
        final = final_answer(text)
        if final is None:
            return None
        answer_at = len(text) - len(final)
    span = _score_span(text, answer_at, scale)
    if span is None:
        return None
    walk = _Walk(tokens, text, span, scale, answer_at)
    walk.position(walk.first(span[0]), "", 0.0)
    if not walk.outcomes:
        return None
    peak = max(logmass for logmass, _ in walk.outcomes)
    proved: dict[int, float] = {}
    unresolved = 0.0
    for logmass, value in walk.outcomes:
        mass = math.exp(logmass - peak)  # the peak is subtracted so exp() cannot underflow all
        if value is None:
            unresolved += mass
        else:
            proved[value] = proved.get(value, 0.0) + mass
    total = math.fsum(proved.values()) + unresolved
    return ScoreDistribution(proved={k: p / total for k, p in sorted(proved.items())},
                             unresolved=unresolved / total)


# -- where the score is ----------------------------------------------------------------------

#: Whitespace as servers that return raw tokens spell it: GPT-2 byte-level and SentencePiece.
_SPACE = "\\s\u0120\u2581"
_KEY = re.compile(f'"score"[{_SPACE}]*:[{_SPACE}]*"?[{_SPACE}]*')
_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"(?<![0-9])[0-9]+")
#: What may stand before the first digit in the token that holds it.
_LEAD = ' \t\r\n:"\u0120\u2581'


def _score_span(text: str, start: int, scale: Scale) -> tuple[int, int] | None:
    """The digits of the score in ``text[start:]``: the value of the first ``"score"`` key,
    or, with no such key, the first number on the scale."""
    key = _KEY.search(text, start)
    if key is not None:
        digits = _DIGITS.match(text, key.end())
        return digits.span() if digits is not None else None
    for number in _NUMBER.finditer(text, start):
        if _on_scale(number.group(), scale):
            return number.span()
    return None


def _on_scale(digits: str, scale: Scale) -> bool:
    return digits == str(int(digits)) and scale[0] <= int(digits) <= scale[1]


# -- the tree of digits ----------------------------------------------------------------------


class _Walk:
    """Walks the positions of the written number, collecting ``(log p, value)`` outcomes;
    ``value`` is ``None`` for an unresolved alternative."""

    def __init__(self, tokens: Sequence[TokenLogprob], text: str, span: tuple[int, int],
                 scale: Scale, answer_at: int) -> None:
        self.tokens = tokens
        self.text = text
        self.span = span
        self.scale = scale
        self.ends: list[int] = []
        end = 0
        for token in tokens:
            end += len(token.token)
            self.ends.append(end)
        # a token of two or more digits in the answer shows a tokenizer that keeps digits
        # together (the thinking before it is not searched: it may be long)
        self.chunked = any(_is_multi_digit(t.token) or any(_is_multi_digit(a) for a, _ in t.top)
                           for t in tokens[self.first(answer_at):])
        self.outcomes: list[tuple[float, int | None]] = []

    def first(self, offset: int) -> int:
        """The index of the token holding the character at ``offset`` of the text."""
        return bisect.bisect_right(self.ends, offset)

    def position(self, index: int, prefix: str, logmass: float) -> None:
        """Spread ``exp(logmass)``, the probability of ``prefix`` written before token
        ``index``, over the alternatives at ``index``."""
        token = self.tokens[index]
        start, end = self.ends[index] - len(token.token), self.ends[index]
        number_start, number_end = self.span
        # the digits of the score this token wrote, if it continues the number
        written = (self.text[max(start, number_start):end]
                   if start < number_end and end <= number_end else None)
        for alternative, logprob in _alternatives(token):
            if not math.isfinite(logprob):
                continue
            body = alternative.lstrip(_LEAD) if not prefix else alternative
            digits = _DIGITS.match(body)
            if digits is None:  # no digit: the number ended before it (or never started)
                if prefix:
                    self._proved(prefix, logmass + logprob)
                continue
            number = prefix + digits.group()
            if digits.end() < len(body):  # digits then something else: the number ends here
                self._proved(number, logmass + logprob)
            elif digits.group() == written and self._extends(number):
                if index + 1 < len(self.tokens):
                    self.position(index + 1, number, logmass + logprob)
                else:  # the reply ends with the number
                    self._proved(number, logmass + logprob)
            elif self.chunked and len(digits.group()) < MAX_DIGIT_CHUNK:
                self._proved(number, logmass + logprob)
            else:
                reached = self._reached(number)
                if len(reached) == 1:
                    self.outcomes.append((logmass + logprob, reached[0]))
                elif reached:
                    self.outcomes.append((logmass + logprob, None))

    def _proved(self, number: str, logmass: float) -> None:
        if _on_scale(number, self.scale):
            self.outcomes.append((logmass, int(number)))

    def _extends(self, number: str) -> bool:
        """Whether a scale value longer than the digits ``number`` begins with them."""
        return len(self._reached(number, longer=True)) > 0

    def _reached(self, number: str, *, longer: bool = False) -> list[int]:
        """Up to two scale values that begin with the digits ``number`` (only values
        longer than ``number`` if ``longer``)."""
        if number != "0" and number.startswith("0"):
            return []
        low, high = self.scale
        value, width = int(number), 1
        found: list[int] = []
        while value * width <= high and len(found) < 2:
            if width > 1 or not longer:  # values value*width .. value*width + width - 1
                first = max(low, value * width)
                found.extend(range(first, min(high, value * width + width - 1) + 1)[:2])
            if value == 0:
                break  # no longer number begins with a 0
            width *= 10
        return found[:2]


def _alternatives(token: TokenLogprob) -> tuple[tuple[str, float], ...]:
    """The alternatives at ``token``'s position: its ``top_logprobs`` and itself, or only
    itself (probability 1) when the reply lists none."""
    if not token.top:
        return ((token.token, 0.0),)
    if any(text == token.token for text, _ in token.top):
        return token.top
    return (*token.top, (token.token, token.logprob))


def _is_multi_digit(token: str) -> bool:
    digits = token.strip(_LEAD)
    return len(digits) >= 2 and digits.isdigit() and digits.isascii()
