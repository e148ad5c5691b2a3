"""The gateway's own request and reply models, and item validation with structured errors.

Items are the broker's ``ScoreItem`` JSON, checked by the broker's own
``parse_items``; a request with any invalid item is refused as a whole (422), each
problem naming the item's index, its id when it has one, and the field, and nothing is
enqueued.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rewardq.broker.errors import InvalidItemError
from rewardq.broker.schemas import ResultStatus, ScoreItem, ScoreResult, parse_items
from rewardq.gateway.auth import TOKEN_NAME_KEY
from rewardq.gateway.errors import GatewayRequestError

_FIELD_IN_MESSAGE = re.compile(r"field '([^']*)'")
_M = TypeVar("_M", bound=BaseModel)


class _Edge(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScoreRequest(_Edge):
    """``POST /v1/score`` and ``POST /v1/score/stream``."""

    items: list[Any] = Field(description="Item JSON objects (id, prompt, response, optional "
                                         "reference, data_source, uid, metadata).")
    step: int | None = Field(default=None, ge=0, description="Training step, recorded with "
                                                             "the chunks and dead letters.")
    timeout_s: float | None = Field(default=None, gt=0, description="Seconds to wait; default "
                                    "and maximum REWARDQ_CHUNK_DEADLINE_S.")
    partial: bool = Field(default=False, description="On timeout answer 200 with the "
                          "unfinished items as status timeout, instead of 504.")


class ScoreResponse(_Edge):
    """The reply of ``POST /v1/score``: one result per item, in input order."""

    results: list[ScoreResult]


class ResultLine(_Edge):
    """One NDJSON line of ``POST /v1/score/stream``: a result as soon as it is known."""

    index: int = Field(description="The item's position in the request.")
    pending_chunks: int = Field(description="Chunks of this request still being judged "
                                            "when this line was sent.")
    result: ScoreResult


class EndLine(_Edge):
    """The last NDJSON line of ``POST /v1/score/stream``."""

    done: Literal[True] = True
    count: int = Field(description="Result lines sent.")
    chunks: int = Field(description="Chunks the request was split into.")
    cache_hits: int = Field(description="Items answered from the cache at submit.")
    error: str | None = Field(default=None, description="Set when the stream ended early "
                                                        "(timeout, no_workers, ...).")
    message: str | None = None


class Problem(_Edge):
    """One invalid field of one item (or of the request)."""

    item: int | None = Field(default=None, description="Index of the item in the request.")
    id: str | None = Field(default=None, description="The item's id, if it had one.")
    field: str | None = Field(default=None, description="Dotted path of the field.")
    message: str


class ErrorBody(_Edge):
    """Every 4xx/5xx reply."""

    error: str = Field(description="Machine-readable code: unauthorized, too_large, "
                                   "invalid_items, too_many_requests, timeout, ...")
    message: str
    problems: list[Problem] | None = None


def request_problems(exc: ValidationError) -> list[dict[str, Any]]:
    """``Problem`` JSON for a request model's validation errors."""
    return [Problem(field=".".join(str(p) for p in e["loc"]) or None,
                    message=e["msg"]).model_dump(exclude_none=True) for e in exc.errors()]


def parse_request(model: type[_M], body: bytes) -> _M:
    """``body`` as JSON, validated by ``model``.

    Raises:
        GatewayRequestError: 400 for a body that is not JSON, 422 naming each bad field.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise GatewayRequestError(400, "bad_json", f"the body is not JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise GatewayRequestError(422, "invalid_request", "the request is invalid",
                                  problems=request_problems(exc)) from None


def check_items(raw_items: Sequence[Any], token: str) -> list[ScoreItem]:
    """Validate every item with the broker's rules and stamp the caller's token name.

    Args:
        raw_items: the request's item JSON objects.
        token: the caller's token name, put into each item's metadata
            (:data:`~rewardq.gateway.auth.TOKEN_NAME_KEY`, replacing any value the caller sent).

    Raises:
        GatewayRequestError: 422 ``invalid_items`` listing every bad field of every item;
            nothing has been enqueued.
    """
    try:
        items = parse_items(raw_items)
    except InvalidItemError:
        raise _invalid_items(raw_items) from None
    return [item.model_copy(update={"metadata": {**item.metadata, TOKEN_NAME_KEY: token}})
            for item in items]


def _invalid_items(raw_items: Sequence[Any]) -> GatewayRequestError:
    """The 422 for items some of which are invalid, checked one by one to tell exactly
    which fields of which items."""
    problems: list[dict[str, Any]] = []
    for index, raw in enumerate(raw_items):
        try:
            parse_items([raw], label=f"item {index}".format)
        except InvalidItemError as exc:
            problems.extend(_item_problems(index, raw, exc))
    head = "; ".join(p["message"] for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return GatewayRequestError(422, "invalid_items",
                               f"{len(problems)} invalid item field(s), nothing was "
                               f"enqueued: {head}{more}", problems=problems)


def _item_problems(index: int, raw: Any, exc: InvalidItemError) -> list[dict[str, Any]]:
    """Structured problems of one item the broker refused."""
    item_id = raw.get("id") if isinstance(raw, dict) else None
    item_id = item_id if isinstance(item_id, str) else None
    try:  # the model's errors carry each field's path
        ScoreItem.model_validate(raw)
    except ValidationError as err:
        return [Problem(item=index, id=item_id,
                        field=".".join(str(p) for p in e["loc"]) or None,
                        message=f"item {index}: field "
                                f"{'.'.join(str(p) for p in e['loc']) or '<item>'!r}: {e['msg']}"
                        ).model_dump(exclude_none=True) for e in err.errors()]
    # A rule of parse_items beyond the model (e.g. metadata size): its message names it.
    out = []
    for text in exc.problems:
        match = _FIELD_IN_MESSAGE.search(text)
        out.append(Problem(item=index, id=item_id, field=match.group(1) if match else None,
                           message=text).model_dump(exclude_none=True))
    return out



def check_each(raw_items: Sequence[Any], token: str) -> list[ScoreItem | ScoreResult]:
    """Validate item by item (the remote-RM endpoints): a valid item comes back stamped as
    by :func:`check_items`, an invalid one as its ``invalid`` result, so that it fails
    alone instead of refusing its request."""
    try:  # all valid, the usual case: one validation pass
        return list(check_items(raw_items, token))
    except GatewayRequestError:
        pass
    checked: list[ScoreItem | ScoreResult] = []
    for index, raw in enumerate(raw_items):
        try:
            checked.extend(check_items([raw], token))
        except GatewayRequestError as exc:
            item_id = raw.get("id") if isinstance(raw, dict) else None
            checked.append(ScoreResult.failure(
                item_id if isinstance(item_id, str) else f"item-{index}",
                ResultStatus.INVALID, "; ".join(
                    p["message"] for p in exc.extra.get("problems", [])) or exc.message))
    return checked
