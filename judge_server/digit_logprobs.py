"""Logprobs of a tokenizer that writes numbers digit by digit; pure, no I/O.

Qwen2/2.5/3 (and the R1 distills built on them) and Mistral's tokenizers split every
number into single digits, so a score of 10 is two tokens, ``"1"`` then ``"0"``
(Llama 3, DeepSeek-V3 and OpenAI's tokenizers keep up to three digits together). The
``digit-logprobs`` profile answers ``logprobs: true`` the way such a model does.

**The distribution the judge means.** For a grade ``s`` it means ``s`` with probability
``q`` (``JudgeConfig.digit_confidence``) and one neighbour ``n`` with ``1 - q``
(:func:`neighbour`; ``JudgeConfig.digit_neighbour``), nothing else:
:func:`intended_distribution`. The expectation it means is therefore
``q * s + (1 - q) * n`` (:func:`intended_expectation`), which a test computes for every
value of the scale, 1 and 10 included. It writes ``s`` (the most likely value when
``q >= 0.5``).

**How the tokens carry it** (:func:`digit_logprobs_content`), with ``p`` that
distribution over 1..10:

* at the score's first digit, each first digit ``d`` has the probability of all values
  starting with it: ``"1"`` has ``p(1) + p(10)``, ``"2"``..``"9"`` their own;
* after a ``"1"`` the model chooses between ending the number and writing ``"0"``: at
  that position, conditional on ``"1"``, ``"0"`` has ``p(10) / (p(1) + p(10))`` and the
  JSON token that follows the number (``","`` or ``"}"``) the rest. When the judge
  writes 10, that position is the ``"0"``; when it writes 1, it is the token after;
* when it writes any other value, the position after its digit is certain: a ``"1"``
  alternative at the first digit cannot be told apart as 1 or 10 from the reply alone
  (the next position's alternatives are only shown for the path taken).

Every other token is certain (logprob 0, itself its only alternative). Alternatives
of probability 0 are left out, as an engine's top-k list would not show them.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: The judge's score scale.
SCALE = range(1, 11)
#: Single digits, words, whitespace runs and punctuation runs: a digit-splitting
#: tokenizer's view of a JSON verdict (``{"score": 10}`` -> ``{"``, ``score``, ``":``,
#: `` ``, ``1``, ``0``, ``}``).
_DIGIT_TOKEN = re.compile(r"\d|[^\W\d]+|\s+|[^\w\s]+")


def neighbour(score: int, how: str) -> int:
    """The value that gets the judge's remaining probability for ``score``.

    ``how`` is ``"inward"`` (towards the middle: 1-5 -> score + 1, 6-10 -> score - 1),
    ``"up"`` (score + 1, but 10 -> 9) or ``"down"`` (score - 1, but 1 -> 2).

    Raises:
        ValueError: a score off the scale or an unknown ``how``.
    """
    if score not in SCALE:
        raise ValueError(f"score {score} is off the 1..10 scale")
    if how == "inward":
        return score + 1 if score <= 5 else score - 1
    if how == "up":
        return score + 1 if score < 10 else 9
    if how == "down":
        return score - 1 if score > 1 else 2
    raise ValueError(f"unknown neighbour rule {how!r}")


def intended_distribution(score: int, confidence: float, how: str) -> dict[int, float]:
    """The judge's distribution over 1..10 when it writes ``score``: ``score`` with
    ``confidence``, :func:`neighbour` with the rest (values of probability 0 left out)."""
    dist = {score: confidence}
    rest = 1.0 - confidence
    if rest > 0.0:
        dist[neighbour(score, how)] = rest
    return dist


def intended_expectation(score: int, confidence: float, how: str) -> float:
    """The score the judge means on average: the expectation of
    :func:`intended_distribution`, what a logprob reader should recover."""
    return math.fsum(k * p for k, p in intended_distribution(score, confidence, how).items())


def digit_tokens(content: str) -> list[str]:
    """``content`` as a digit-splitting tokenizer would cut it (see ``_DIGIT_TOKEN``)."""
    return _DIGIT_TOKEN.findall(content)


def digit_logprobs_content(content: str, score: int | None, dist: dict[int, float],
                           top_logprobs: int) -> list[dict[str, Any]]:
    """``choices[0].logprobs.content`` for ``content`` tokenized digit by digit, with
    ``dist`` (value -> probability) spread over the digits of the score the verdict
    writes (the first run of digits equal to ``score`` after ``"score"``), as the module
    docstring describes; ``top_logprobs`` alternatives at most per position."""
    tokens = digit_tokens(content)
    first = _score_token_index(tokens, content, score)
    entries = []
    for i, token in enumerate(tokens):
        if first is not None and score is not None and i == first:
            alternatives = _first_digit(dist)
        elif first is not None and score in (1, 10) and i == first + 1:
            ender = tokens[i + 1] if score == 10 and i + 1 < len(tokens) else token
            alternatives = _after_one(dist, ender)
        else:
            alternatives = {token: 1.0}
        ranked = sorted(alternatives.items(), key=lambda kv: -kv[1])
        entries.append({**_entry(token, alternatives.get(token, 0.0)),
                        "top_logprobs": [_entry(t, p) for t, p in ranked[:top_logprobs]]})
    return entries


def _score_token_index(tokens: list[str], content: str, score: int | None) -> int | None:
    """Index of the score's first digit token, or ``None`` when it is not written."""
    if score is None:
        return None
    start = content.find('"score"')
    if start < 0:
        return None
    digits = str(score)
    offset = 0
    for i, token in enumerate(tokens):
        if offset > start and "".join(tokens[i:i + len(digits)]) == digits:
            following = tokens[i + len(digits)] if i + len(digits) < len(tokens) else ""
            if not following.isdigit():
                return i
        offset += len(token)
    return None


def _first_digit(dist: dict[int, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for value, p in dist.items():
        if p > 0.0:
            digit = str(value)[0]
            out[digit] = out.get(digit, 0.0) + p
    return out


def _after_one(dist: dict[int, float], ender: str) -> dict[str, float]:
    """The position after a first digit ``"1"``: ``"0"`` against ``ender``, the JSON token
    that ends the number (``","`` or ``"}"``), conditional on the ``"1"``."""
    p1, p10 = dist.get(1, 0.0), dist.get(10, 0.0)
    total = p1 + p10
    out: dict[str, float] = {}
    if p10 > 0.0:
        out["0"] = p10 / total
    if p1 > 0.0:
        out[ender] = p1 / total
    return out


def _entry(token: str, p: float) -> dict[str, Any]:
    logprob = math.log(p) if p > 0.0 else -9999.0
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
