"""Reading a score out of the judge's reply; pure, no I/O.

``classify`` maps an ``openai`` SDK error to rewardq's transient/permanent judge errors,
so the workers and the in-process sync judge decide retries the same way. A client that
speaks HTTP without the SDK (the workers' ``direct`` transport) builds the same errors
from the same parts: :func:`http_error` for an error status (with ``Retry-After``),
:func:`timeout_error` and :func:`network_error` for no answer.

The judge is asked for ``{"score": <1-10>, ...}``. Real models wrap that in prose or
code fences, or answer with a bare number, so the parser tries, in order: the whole
reply as JSON, the first ``{...}`` object in it, then the first plain number. The score
is clamped to the scale and normalized to [0, 1].
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from rewardq.broker.errors import (
    JudgeError,
    JudgeErrorKind,
    PermanentJudgeError,
    RefusedParameterError,
    TransientJudgeError,
    UnparseableReplyError,
)
from rewardq.judge.prompts import SCALE_MAX, SCALE_MIN

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
        return timeout_error(str(exc))
    if isinstance(exc, openai.APIConnectionError):
        return network_error(str(exc))
    if isinstance(exc, openai.APIStatusError):
        param = exc.param if exc.code in REFUSAL_CODES and isinstance(exc.param, str) else None
        return http_error(exc.status_code, exc.response.headers, str(exc.message), param=param)
    return PermanentJudgeError(f"judge error: {exc}")


#: OpenAI's error codes for a request parameter a model does not take.
REFUSAL_CODES = ("unsupported_parameter", "unsupported_value")


def http_error(status: int, headers: Mapping[str, str], detail: str, *,
               param: str | None = None) -> JudgeError:
    """The ``JudgeError`` of an HTTP error answer (status >= 400), however it was received.

    Args:
        status: the HTTP status.
        headers: the answer's headers, looked up case-insensitively (``httpx`` and
            ``aiohttp`` headers both are); ``retry-after-ms``, else ``Retry-After`` in
            seconds, becomes ``retry_after_s`` of a transient error (an HTTP date is not
            honoured).
        detail: what the answer said (:func:`status_detail`); cut to 200 characters.

        param: the request parameter the answer refuses (:func:`refused_param`).

    Returns:
        A ``TransientJudgeError`` for 408, 409, 429 and 5xx, a ``RefusedParameterError``
        for a 400 refusing ``param``, else a ``PermanentJudgeError``; all carry
        ``status_code``.
    """
    message = f"judge answered HTTP {status}: {detail[:200]}"
    if status in (408, 409, 429) or status >= 500:
        return TransientJudgeError(message, status_code=status,
                                   retry_after_s=_retry_after_s(headers))
    if param is not None and status == 400:
        return RefusedParameterError(message, param=param, status_code=status)
    return PermanentJudgeError(message, status_code=status)


def refused_param(status: int, body: bytes) -> str | None:
    """The parameter an error answer refuses, as OpenAI says it: ``error.code``
    ``unsupported_parameter`` or ``unsupported_value`` with ``error.param``."""
    if status != 400:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or error.get("code") not in REFUSAL_CODES:
        return None
    param = error.get("param")
    return param if isinstance(param, str) and param else None


def status_detail(status: int, body: bytes) -> str:
    """An error answer's detail as the ``openai`` SDK words it: ``Error code: <status>``,
    then `` - <message>`` when the body is JSON with an ``error.message`` (or a top-level
    ``message``)."""
    detail = f"Error code: {status}"
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return detail
    error = data.get("error", data) if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f"{detail} - {message}" if isinstance(message, str) and message else detail


def timeout_error(detail: str) -> TransientJudgeError:
    """The error of a call that got no answer within the judge timeout."""
    return TransientJudgeError(f"judge timed out: {detail}", kind=JudgeErrorKind.TIMEOUT)


def network_error(detail: str) -> TransientJudgeError:
    """The error of a call whose connection could not be made, or broke."""
    return TransientJudgeError(f"judge unreachable: {detail}", kind=JudgeErrorKind.NETWORK)


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)  # 350 ms: 0.35 s, not 0.35000000000000003
        except ValueError:
            continue
    return None
