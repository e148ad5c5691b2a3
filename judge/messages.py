"""The text of an OpenAI chat message, for what is estimated before a call is made.

The rate limiter's token estimate (``rewardq.workers.rate_limit.estimate_tokens``) and the
judge budget's worst case (``rewardq.workers.budget.worst_case_tokens``) both count the
text a request sends; this is the one place that says what that text is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

__all__ = ["message_texts"]


def message_texts(message: object, fields: Sequence[str] = ("content",)) -> Iterator[str]:
    """The texts of one chat message, in order: each of ``fields`` that is a string, and the
    ``text`` of every part of each that is a list of parts (``{"type": "text", "text":
    ...}``). Parts without a string ``text`` (images, audio), fields that are ``None`` or
    missing, and a message that is not a mapping have no text.
    """
    if not isinstance(message, Mapping):
        return
    for field in fields:
        value = message.get(field)
        if isinstance(value, str):
            yield value
        elif isinstance(value, Sequence):
            for part in value:
                text = part.get("text") if isinstance(part, Mapping) else None
                if isinstance(text, str):
                    yield text
