"""Wire schemas: what crosses the broker and the JSONL files, as JSON only.

``ScoreItem`` is one (prompt, response) pair a trainer wants scored, ``ScoreChunk`` a
Celery task's payload (a slice of a step's items plus the judge spec), ``ScoreResult``
the answer for one item, and ``JudgeVerdict`` what the cache stores per judged pair.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from json.encoder import encode_basestring as _json_str
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from rewardq.broker.errors import InvalidItemError

MAX_ID_CHARS = 256
#: Longest prompt or response: a 128k-token context is about 512k characters.
MAX_TEXT_CHARS = 600_000
#: Longest reference answer.
MAX_REFERENCE_CHARS = 64_000
MAX_METADATA_JSON_CHARS = 16_000


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ScoreItem(_Wire):
    """One (prompt, response) pair to score; ``reference`` selects the correctness rubric.

    ``response`` is the rollout as the policy wrote it, thinking included, and may be
    empty: the producer shows the judge only its view of it (``rewardq.judge.rollout_view``),
    and a rollout with no final answer gets ``no_answer`` without a judge call.
    """

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    response: str = Field(max_length=MAX_TEXT_CHARS)
    reference: str | None = Field(default=None, max_length=MAX_REFERENCE_CHARS)
    data_source: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    uid: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    #: The rubric to judge with, by name; unset = chosen by ``data_source`` (see
    #: ``rewardq.judge.rubrics.RubricBook.select``). The producer fills it in before sending.
    rubric: str | None = Field(default=None, max_length=MAX_ID_CHARS)
    metadata: dict[str, Any] = Field(default_factory=dict)


#: How a verdict's score is read: the written integer, or the expectation of the scale
#: tokens' logprobs.
ScoreMode = Literal["parsed", "logprobs"]
#: Where a verdict's score came from; ``parsed_fallback``: logprobs were asked for but the
#: reply carried none on the scale, so the written integer stands in.
ScoreSource = Literal["parsed", "logprobs", "logprobs_partial", "parsed_fallback"]
#: ``logprobs_partial``: part of the probability mass could not be attributed to one score
#: (a "1" that may begin a "10" on a digit-by-digit tokenizer); the expectation is over
#: the part that could (``rewardq.judge.logprob_scores``).


Aggregate = Literal["mean", "majority"]
GroupMode = Literal["listwise", "pairwise"]


class GroupSpec(_Wire):
    """Judge a GRPO group (items sharing a ``uid``) relative to itself.

    ``listwise``: one call scores the whole group. ``pairwise``: every pair of members is
    judged in both orders (position swap); a member's score is its share of wins.
    """

    mode: GroupMode
    size: int = Field(ge=2, le=64, description="Members per group (the rollouts per prompt).")


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
#: What the judge is shown of a rollout (``rewardq.judge.rollout_view``).
View = Literal["final_answer", "full"]


class JudgeOptions(_Wire):
    """Request options of one judge model; unset fields take the fleet-wide ones."""

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    reasoning_effort: ReasoningEffort | None = None
    #: Fields sent as written in the request body (e.g. vLLM's ``chat_template_kwargs``).
    extra_body: dict[str, Any] = Field(default_factory=dict)
    structured_output: bool = False


class JudgeSpec(_Wire):
    """Everything besides the item that changes the judge's answer (part of the cache key)."""

    model: str = Field(min_length=1)
    prompt_version: str = Field(min_length=1)
    #: ``None``: sent as the family takes it (``rewardq.judge.judge_request``).
    temperature: float | None = 0.0
    #: The reply budget; ``None``: the model family's (larger for judges that think).
    max_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: ReasoningEffort | None = None
    extra_body: dict[str, Any] = Field(default_factory=dict)
    #: Ask for ``{"score": <integer>}`` through ``response_format`` (structured outputs).
    structured_output: bool = False
    #: Per-judge options by model, over the fleet-wide ones above.
    judge_options: dict[str, JudgeOptions] = Field(default_factory=dict)
    #: What the judge is shown of each rollout, and at most how many tokens of it.
    view: View = "final_answer"
    view_max_tokens: int = Field(default=8192, ge=16)
    #: ``parsed``: the integer the judge wrote; ``logprobs``: the expectation over the
    #: scale tokens' probabilities where it wrote it (G-Eval).
    score_mode: ScoreMode = "parsed"
    #: Digest of each rubric the chunk's items name (``rewardq.judge.rubrics``): a worker whose
    #: rubric differs refuses those items instead of judging with the wrong one.
    rubrics: dict[str, str] = Field(default_factory=dict)
    #: An ensemble: the judge models asked about every item (empty: ``model`` alone),
    #: each asked ``samples`` times (at temperature > 0), aggregated by ``aggregate``.
    judges: tuple[str, ...] = Field(default=(), strict=False)  # a list on the wire
    samples: int = Field(default=1, ge=1, le=16)
    aggregate: Aggregate = "mean"
    #: Judge items sharing a ``uid`` as a group (unset: each item alone).
    group: GroupSpec | None = None

    def request_key(self) -> str:
        """The request options that change the answer, as JSON for the cache key: empty
        at their defaults."""
        fields = ("reasoning_effort", "extra_body", "structured_output", "judge_options",
                  "view", "view_max_tokens")
        defaults = type(self).model_fields
        changed = {name: getattr(self, name) for name in fields
                   if getattr(self, name) != defaults[name].get_default(
                       call_default_factory=True)}
        if not changed:
            return ""
        return "," + json.dumps(_jsonable(changed), sort_keys=True, separators=(",", ":"),
                                ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class ScoreChunk(_Wire):
    """A Celery task's payload: a slice of one step's items and how to judge them."""

    job_id: str
    chunk_index: int = Field(ge=0)
    step: int | None = None
    spec: JudgeSpec
    items: list[ScoreItem] = Field(min_length=1)
    #: Absolute unix time after which nobody waits for this chunk any more.
    deadline: float


class ResultStatus(enum.StrEnum):
    """What became of one item."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    INVALID = "invalid"
    #: not judged: the fleet-wide judge budget was spent (dead-lettered: replay it later)
    BUDGET_EXCEEDED = "budget_exceeded"
    #: not judged: the rollout has no final answer to show the judge (it is empty, or its
    #: thinking was never closed: cut at the policy's length limit)
    NO_ANSWER = "no_answer"


class Usage(_Wire):
    """Token counts from the judge's reply (``usage`` of chat completions).

    ``reasoning_tokens`` (``completion_tokens_details.reasoning_tokens``) are part of
    ``completion_tokens``, as the providers count and bill them.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0


class JudgeVerdict(_Wire):
    """A successful judgement of one (spec, item) pair; what the cache holds."""

    score: float = Field(ge=0.0, le=1.0, description="Normalized to [0, 1].")
    raw_score: float
    usage: Usage = Field(default_factory=Usage)
    score_source: ScoreSource = "parsed"  # the default reads verdicts cached before it
    #: Group judging: how consistent the group's judgements of this item were (pairwise:
    #: the share of its pairs whose two orders agreed).
    agreement: float | None = None


class JudgeScore(_Wire):
    """One ensemble member's verdict on an item."""

    judge: str = Field(description="The judge model (with #k for its k-th sample).")
    score: float
    raw_score: float


class ScoreResult(BaseModel):
    """The answer for one item, in the order the items were submitted."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    id: str
    status: ResultStatus
    score: float | None = None
    raw_score: float | None = None
    cached: bool = False
    attempts: int = 0
    latency_ms: float = 0.0
    usage: Usage | None = None
    error: str | None = None
    score_source: ScoreSource | None = None
    #: Ensembles: each judge's verdict; ``agreement``: the share of judges that gave the
    #: most common raw score (ensembles) or the group's consistency (group judging).
    judges: list[JudgeScore] | None = None
    agreement: float | None = None

    @classmethod
    def from_verdict(cls, item_id: str, verdict: JudgeVerdict, *, cached: bool,
                     attempts: int = 0, latency_ms: float = 0.0) -> ScoreResult:
        """An ``ok`` result carrying ``verdict``'s score."""
        # Built without validation: every field comes from a validated verdict or is
        # typed here, so validating them again would only cost a step's time.
        return cls.model_construct(id=item_id, status=ResultStatus.OK, score=verdict.score,
                                   raw_score=verdict.raw_score, cached=cached,
                                   attempts=attempts, latency_ms=latency_ms,
                                   usage=verdict.usage, error=None,
                                   score_source=verdict.score_source, judges=None,
                                   agreement=verdict.agreement)

    @classmethod
    def from_cached_verdicts(cls, ids: Sequence[str],
                             verdicts: Sequence[bytes | str]) -> list[ScoreResult]:
        """The ``cached`` ``ok`` results of items whose verdict JSON the cache held.

        One validation pass in all: each verdict's object is spliced into its result's
        JSON (``{<the verdict's fields>,"id":..,"status":"ok","cached":true}``; a
        verdict's fields are a subset of a result's, and the fields written last win)
        and the whole list is validated at once, then the verdicts' own constraints are
        checked on the results, and the defaults of fields an older verdict lacks are the
        verdict's. Each verdict's JSON is parsed once, not once as a verdict and again
        as a result.

        Raises:
            ValueError: a value is not a cached verdict (pydantic's ``ValidationError``,
                or a score missing or outside [0, 1]).
        """
        parts = []
        for item_id, verdict in zip(ids, verdicts, strict=True):
            body = (verdict if isinstance(verdict, bytes) else verdict.encode()).strip()
            if body[:1] != b"{" or body[-1:] != b"}":
                raise ValueError(f"cached verdict of {item_id!r} is not a JSON object")
            parts.append(b"%s%s\"id\":%s,\"status\":\"ok\",\"cached\":true}" % (
                body[:-1], b"," if body != b"{}" else b"", _json_str(item_id).encode()))
        results = SCORE_RESULTS.validate_json(b"[" + b",".join(parts) + b"]", strict=True)
        for result in results:
            score, raw = result.score, result.raw_score
            if score is None or raw is None or not 0.0 <= score <= 1.0 \
                    or result.error is not None or result.judges is not None:
                raise ValueError(f"cached verdict of {result.id!r} is not a verdict")
            if len(result.model_fields_set) != _SPLICED_FIELDS:  # a field left out
                for name, default in _VERDICT_DEFAULTS.items():
                    if name not in result.model_fields_set:
                        setattr(result, name, default)
        return results

    @classmethod
    def failure(cls, item_id: str, status: ResultStatus, error: str, *,
                attempts: int = 0, latency_ms: float = 0.0) -> ScoreResult:
        """A non-``ok`` result; ``score`` stays ``None`` so nobody trains on a silent 0."""
        return cls(id=item_id, status=status, error=error, attempts=attempts,
                   latency_ms=latency_ms)


assert set(JudgeVerdict.model_fields) <= set(ScoreResult.model_fields), \
    "ScoreResult.from_cached_verdicts splices a verdict's fields into a result"
#: Validates a list of results in one call (a chunk's, or a step's cache hits).
SCORE_RESULTS = TypeAdapter(list[ScoreResult])
#: A spliced verdict with every field: the verdict's, then id, status and cached.
_SPLICED_FIELDS = len(JudgeVerdict.model_fields) + 3
#: Where a verdict's default differs from a result's (``usage``: zero tokens, not None).
_VERDICT_DEFAULTS = {
    name: field.get_default(call_default_factory=True)
    for name, field in JudgeVerdict.model_fields.items()
    if not field.is_required() and field.get_default(call_default_factory=True)
    != ScoreResult.model_fields[name].get_default(call_default_factory=True)}


def _describe(label: str, raw: object, err: Mapping[str, Any]) -> str:
    item_id = raw.get("id") if isinstance(raw, Mapping) else None
    where = label + (f" (id={item_id!r})" if isinstance(item_id, str) else "")
    field = ".".join(str(p) for p in err.get("loc", ())) or "<item>"
    return f"{where}: field {field!r}: {err.get('msg', 'invalid')}"


def parse_items(raw_items: Iterable[object], *,
                label: Callable[[int], str] = "item {}".format) -> list[ScoreItem]:
    """Validate raw mappings (or ``ScoreItem`` s) into items, all problems reported at once.

    Args:
        raw_items: mappings with the item JSON fields, or ``ScoreItem`` instances.
        label: names the item at an index in messages (e.g. its line in a file).

    Raises:
        InvalidItemError: one line per bad field, naming the item index, id and field.
    """
    raw_list = raw_items if isinstance(raw_items, list) else list(raw_items)
    if all(type(raw) is dict for raw in raw_list):  # the common case: one pass in Rust
        try:
            items = _ITEMS.validate_python(raw_list)
        except ValidationError:
            pass  # the loop below names each problem
        else:
            if not any(_metadata_too_large(item) for item in items):
                return items
    items = []
    problems: list[str] = []
    for index, raw in enumerate(raw_list):
        if isinstance(raw, ScoreItem):
            items.append(raw)
            continue
        if not isinstance(raw, Mapping):
            problems.append(f"{label(index)}: expected a JSON object, got {type(raw).__name__}")
            continue
        try:
            item = ScoreItem.model_validate(raw if isinstance(raw, dict) else dict(raw))
        except ValidationError as exc:
            problems.extend(_describe(label(index), raw, e) for e in exc.errors())
            continue
        if _metadata_too_large(item):
            problems.append(_describe(label(index), raw, {
                "loc": ("metadata",),
                "msg": f"larger than {MAX_METADATA_JSON_CHARS} characters as JSON"}))
            continue
        items.append(item)
    if problems:
        raise InvalidItemError(problems)
    return items


#: A whole list of item mappings validated in one call, not one call per item.
_ITEMS = TypeAdapter(list[ScoreItem])


def _metadata_too_large(item: ScoreItem) -> bool:
    return bool(item.metadata) and \
        len(json.dumps(item.metadata, default=str)) > MAX_METADATA_JSON_CHARS
