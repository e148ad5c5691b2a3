"""Reading a score out of the judge's reply; pure, no I/O.

The judge is asked for ``{"score": <1-10>, ...}``. Real models wrap that in prose or
code fences, or answer with a bare number, so the parser tries, in order: the whole
reply as JSON, the first ``{...}`` object in it, then the first plain number. The score
is clamped to the scale and normalized to [0, 1].
"""

from __future__ import annotations

import json
import math
import re

from broker.errors import UnparseableReplyError
from broker.prompts import SCALE_MAX, SCALE_MIN

_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def extract_raw_score(reply: str | None) -> float:
    """The judge's score as written, before clamping.

    Raises:
        UnparseableReplyError: no score could be read from the reply.
    """
    if not reply or not reply.strip():
        raise UnparseableReplyError("judge reply is empty")
    text = reply.strip()
    for candidate in (text, *(m.group(0) for m in _OBJECT.finditer(text))):
        score = _score_from_json(candidate)
        if score is not None:
            return score
    match = _NUMBER.search(text)
    if match is None:
        raise UnparseableReplyError(f"no score in judge reply: {text[:200]!r}")
    value = float(match.group(0))
    if not math.isfinite(value):
        raise UnparseableReplyError(f"non-finite score in judge reply: {text[:200]!r}")
    return value


def normalize(raw: float) -> float:
    """Clamp ``raw`` to the 1-10 scale and map it to [0, 1]."""
    clamped = min(max(raw, SCALE_MIN), SCALE_MAX)
    return (clamped - SCALE_MIN) / (SCALE_MAX - SCALE_MIN)


def _score_from_json(candidate: str) -> float | None:
    try:
        data = json.loads(candidate)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or "score" not in data:
        return None
    value = data["score"]
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None
