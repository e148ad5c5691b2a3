"""Reading a score out of the judge's reply; pure, no I/O.

``classify`` maps an ``openai`` SDK error to rewardq's transient/permanent judge errors,
so the workers and the in-process sync judge decide retries the same way.

The judge is asked for ``{"score": <1-10>, ...}``. Real models wrap that in prose or
code fences, or answer with a bare number, so the parser tries, in order: the whole
reply as JSON, the first ``{...}`` object in it, then the first plain number. The score
is clamped to the scale and normalized to [0, 1].
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from broker.errors import (
    JudgeError,
    JudgeErrorKind,
    PermanentJudgeError,
    TransientJudgeError,
    UnparseableReplyError,
)
from broker.prompts import SCALE_MAX, SCALE_MIN

if TYPE_CHECKING:
    import openai

_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def extract_raw_score(reply: str | None) -> float:
    """The judge's score as written, before clamping.

    Raises:
        UnparseableReplyError: no score could be read from the reply, or a JSON object's
            ``score`` is not a finite number.
    """
    if not reply or not reply.strip():
        raise UnparseableReplyError("judge reply is empty")
    text = reply.strip()
    for candidate in (text, *(m.group(0) for m in _OBJECT.finditer(text))):
        found, score = _score_from_json(candidate)
        if found:
            if score is None:
                raise UnparseableReplyError(f"score is not a finite number: {text[:200]!r}")
            return score
    match = _NUMBER.search(text)
    value = float(match.group(0)) if match else math.nan
    if not math.isfinite(value):
        raise UnparseableReplyError(f"no score in judge reply: {text[:200]!r}")
    return value


def normalize(raw: float, scale: tuple[int, int] = (int(SCALE_MIN), int(SCALE_MAX))) -> float:
    """Clamp ``raw`` to ``scale`` (the rubric's lowest and highest score, 1-10 by default)
    and map it to [0, 1]."""
    low, high = scale
    clamped = min(max(raw, low), high)
    return (clamped - low) / (high - low)


def _score_from_json(candidate: str) -> tuple[bool, float | None]:
    """(whether ``candidate`` is a JSON object with a score, that score if usable)."""
    try:
        data = json.loads(candidate)
    except (ValueError, RecursionError):
        return False, None
    if not isinstance(data, dict) or "score" not in data:
        return False, None
    value = data["score"]
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return True, None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True, None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return True, None
    return True, number if math.isfinite(number) else None


def classify(exc: openai.APIError) -> JudgeError:
    """Map an SDK error to a transient or permanent ``JudgeError``.

    Transient: timeouts, connection errors, 408, 409, 429 and 5xx. Permanent: the rest.
    """
    import openai  # only the shells that call the SDK need it (the producer does not)

    if isinstance(exc, openai.APITimeoutError):
        return TransientJudgeError(f"judge timed out: {exc}", kind=JudgeErrorKind.TIMEOUT)
    if isinstance(exc, openai.APIConnectionError):
        return TransientJudgeError(f"judge unreachable: {exc}", kind=JudgeErrorKind.NETWORK)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retry_after = _retry_after_s(exc)
        message = f"judge answered HTTP {status}: {_short(exc)}"
        if status in (408, 409, 429) or status >= 500:
            return TransientJudgeError(message, status_code=status, retry_after_s=retry_after)
        return PermanentJudgeError(message, status_code=status)
    return PermanentJudgeError(f"judge error: {exc}")


def _retry_after_s(exc: openai.APIStatusError) -> float | None:
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


def _short(exc: openai.APIStatusError) -> str:
    return str(exc.message)[:200]
