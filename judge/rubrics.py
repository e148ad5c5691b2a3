"""Judge rubrics as data: which instructions the judge gets for an item; pure, no I/O
beyond reading the rubrics file once.

A rubric is a system message and a user-message template with named fields, a score
scale, the data sources it applies to and, optionally, its own score mode. A
:class:`RubricBook` holds a run's rubrics and picks one per item: the item's explicit
``rubric``; else the rubric listing the item's ``data_source``; else the book's
``default_with_reference`` (when the item has a reference and the book names one) or its
``default``. Without a file, the book is the built-in v1 pair (``correctness`` for items
with a reference, ``quality`` for the rest).

A rubrics file is TOML::

    default = "helpful"                  # items no rubric claims
    default_with_reference = "math"      # optional: such items that have a reference

    [rubrics.math]
    data_sources = ["gsm8k", "math"]
    scale = [1, 10]                      # the integers the judge may answer (default 1-10)
    score_mode = "logprobs"              # optional: "parsed" or "logprobs" (G-Eval)
    structured_output = true             # optional: ask for {"score": <int>} by JSON schema
    view = "full"                        # optional: show the judge the thinking too
    system = "You are a strict grader."  # optional: the built-in system message
    user = '''
    Does the RESPONSE reach the REFERENCE answer? PROMPT: {prompt}
    REFERENCE: {reference}
    RESPONSE: {response}
    Reply with JSON only: {{"score": <integer 1-10>}}
    '''

Fields a template may use: ``{prompt}``, ``{response}`` (required), ``{reference}``,
``{data_source}``; literal braces are doubled. Every rubric from a file has a
:attr:`Rubric.digest` of what it sends and how its answer is read; the producer puts the
digests on every chunk (``JudgeSpec.rubrics``) and into each item's cache key, so editing a
rubric never serves a stale verdict, and a worker holding another version refuses the item
(``RubricMismatchError``) rather than judge it with the wrong one.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from rewardq.broker.errors import ConfigError, InvalidItemError, RubricMismatchError
from rewardq.broker.schemas import MAX_ID_CHARS, JudgeSpec, ScoreItem, ScoreMode, View
from rewardq.broker.settings import Settings
from rewardq.judge.prompts import (
    CORRECTNESS_V1,
    QUALITY_V1,
    SCALE_MAX,
    SCALE_MIN,
    SYSTEM_V1,
    VERSIONS,
)

__all__ = ["FIELDS", "Rubric", "RubricBook", "builtin_rubrics", "load_rubrics", "rubric_book"]

#: The item fields a template may name.
FIELDS = ("prompt", "response", "reference", "data_source")
_RUBRIC_KEYS = {"data_sources", "scale", "score_mode", "structured_output", "system", "user",
                "view"}
_VIEWS = ("final_answer", "full")
_TOP_KEYS = {"default", "default_with_reference", "rubrics"}
_SCORE_MODES = ("parsed", "logprobs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Rubric:
    """One set of instructions for the judge.

    Attributes:
        name: how items and the book refer to it.
        system: the system message.
        user: the user message template (``str.format`` fields from :data:`FIELDS`).
        scale: the lowest and highest score the judge may give; scores are clamped to it
            and mapped to [0, 1].
        score_mode: how the score is read (``None``: the run's ``judge_score_mode``).
        structured_output: ask for a structured verdict (``None``: the run's setting).
        view: what the judge is shown of a rollout (``None``: the run's ``judge_view``).
        data_sources: the items' ``data_source`` values it is chosen for.
    """

    name: str
    system: str
    user: str
    scale: tuple[int, int] = (int(SCALE_MIN), int(SCALE_MAX))
    score_mode: ScoreMode | None = None
    data_sources: tuple[str, ...] = ()
    fields: frozenset[str] = field(default=frozenset(), compare=False)
    structured_output: bool | None = None
    view: View | None = None

    @cached_property
    def digest(self) -> str:
        """16 hex digits of SHA-256 over what the judge is sent and how its answer is read."""
        material: list[Any] = [self.system, self.user, list(self.scale), self.score_mode]
        if self.structured_output is not None or self.view is not None:
            material += [self.structured_output, self.view]
        blob = json.dumps(material, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def messages(self, item: ScoreItem) -> list[dict[str, str]]:
        """Chat-completions messages asking the judge to score ``item``."""
        user = self.user.format(prompt=item.prompt, response=item.response,
                                reference=item.reference or "",
                                data_source=item.data_source or "")
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def score_mode_for(self, spec: JudgeSpec) -> ScoreMode:
        """The score mode in force: the rubric's own, else the spec's."""
        return self.score_mode or spec.score_mode

    def view_for(self, spec: JudgeSpec) -> View:
        """The rollout view in force: the rubric's own, else the spec's."""
        return self.view or spec.view


@dataclass(frozen=True)
class RubricBook:
    """A run's rubrics and the rule that picks one per item.

    Attributes:
        rubrics: by name.
        default: for items that name no rubric and whose data source none lists.
        default_with_reference: for such items that carry a reference (``None``: ``default``).
        source: the file they came from, or ``"built-in"``.
    """

    rubrics: Mapping[str, Rubric]
    default: str
    default_with_reference: str | None = None
    source: str = "built-in"

    @property
    def builtin(self) -> bool:
        """Whether these are the built-in v1 rubrics (no rubrics file)."""
        return self.source == "built-in"

    @cached_property
    def digests(self) -> dict[str, str]:
        """Each rubric's digest by name; what ``JudgeSpec.rubrics`` carries (empty for the
        built-in rubrics, whose version is ``JudgeSpec.prompt_version``)."""
        return {} if self.builtin else {n: r.digest for n, r in self.rubrics.items()}

    @cached_property
    def _by_source(self) -> dict[str, str]:
        return {source: r.name for r in self.rubrics.values() for source in r.data_sources}

    def select(self, item: ScoreItem) -> str:
        """The name of the rubric ``item`` is judged with (not checked: see :meth:`assign`)."""
        if item.rubric is not None:
            return item.rubric
        if item.data_source is not None and item.data_source in self._by_source:
            return self._by_source[item.data_source]
        if item.reference is not None and self.default_with_reference is not None:
            return self.default_with_reference
        return self.default

    def assign(self, items: Iterable[ScoreItem], *,
               label: Any = "item {}".format) -> list[ScoreItem]:
        """``items`` with their ``rubric`` filled in, all checked before any is sent.

        Raises:
            InvalidItemError: an item names an unknown rubric, or its rubric needs a
                reference the item lacks; one line per item, naming it.
        """
        items = list(items)
        if self.builtin and all(item.rubric is None for item in items):
            # The built-in choice needs no check and no copy: every side (and the cache
            # key, ``rewardq.broker.keys``) derives it from the reference alone.
            return items
        out: list[ScoreItem] = []
        problems: list[str] = []
        for index, item in enumerate(items):
            name = self.select(item)
            rubric = self.rubrics.get(name)
            if rubric is None:
                problems.append(f"{label(index)} (id={item.id!r}): field 'rubric': unknown "
                                f"rubric {name!r}; {self._known()}")
                continue
            if "reference" in rubric.fields and item.reference is None:
                problems.append(f"{label(index)} (id={item.id!r}): field 'reference': rubric "
                                f"{name!r} needs a reference answer")
                continue
            out.append(item if item.rubric == name
                       else item.model_copy(update={"rubric": name}))
        if problems:
            raise InvalidItemError(problems)
        return out

    def rubric_for(self, spec: JudgeSpec, item: ScoreItem) -> Rubric:
        """The rubric to judge ``item`` with, checked against what the producer sent.

        Raises:
            RubricMismatchError: the rubric is unknown here, or its digest differs from
                the chunk's (producer and worker loaded different rubric files), or one
                side has a rubrics file and the other does not.
        """
        name = self.select(item)
        rubric = self.rubrics.get(name)
        if rubric is None:
            raise RubricMismatchError(
                f"rubric {name!r} is unknown to this worker ({self.source}); {self._known()}"
                " — run the producer and the workers with the same REWARDQ_RUBRICS_FILE")
        sent = spec.rubrics.get(name)
        mine = self.digests.get(name)
        if sent != mine:
            raise RubricMismatchError(
                f"rubric {name!r} differs between the producer (digest {sent or 'built-in'}) "
                f"and this worker (digest {mine or 'built-in'}, {self.source}): run both "
                "with the same REWARDQ_RUBRICS_FILE; the item was not judged")
        return rubric

    def _known(self) -> str:
        return f"known: {', '.join(sorted(self.rubrics))}"


def builtin_rubrics() -> RubricBook:
    """The built-in v1 rubrics: ``correctness`` (items with a reference) and ``quality``."""
    return _BUILTIN


def rubric_book(settings: Settings) -> RubricBook:
    """The rubrics of a run: ``settings.rubrics_file`` loaded and checked, or the built-in
    ones of ``settings.judge_prompt_version`` if unset. Entry points call it once.

    Raises:
        ConfigError: the file cannot be read or is not a valid rubrics file (the message
            names the file, the rubric and the line), or the prompt version is unknown.
    """
    if settings.rubrics_file is not None:
        return load_rubrics(settings.rubrics_file)
    if settings.judge_prompt_version not in VERSIONS:
        raise ConfigError(f"unknown judge prompt version {settings.judge_prompt_version!r}; "
                          f"known: {', '.join(VERSIONS)}")
    return builtin_rubrics()


def load_rubrics(path: Path | str) -> RubricBook:
    """Read and check a rubrics file (see the module docstring for its format).

    Raises:
        ConfigError: unreadable file, TOML syntax, an unknown key, a missing or bad
            template field, a bad scale or score mode, a data source claimed twice, a
            default naming no rubric; the message starts ``FILE:LINE: rubric NAME:``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the rubrics file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    where = _Locator(path, text)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise where.error(None, unknown[0], f"unknown key {unknown[0]!r}; the top level has "
                                            f"{', '.join(sorted(_TOP_KEYS))}")
    tables = data.get("rubrics")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: no rubrics: write at least one [rubrics.NAME] table")
    rubrics: dict[str, Rubric] = {}
    claimed: dict[str, str] = {}
    for name, table in tables.items():
        rubric = _rubric(name, table, where)
        for source in rubric.data_sources:
            if source in claimed:
                raise where.error(name, "data_sources", f"data source {source!r} is already "
                                                        f"listed by rubric {claimed[source]!r}")
            claimed[source] = name
        rubrics[name] = rubric
    default = data.get("default")
    if default is None and len(rubrics) == 1:
        default = next(iter(rubrics))
    if not isinstance(default, str) or default not in rubrics:
        raise where.error(None, "default", f"'default' must name one of the rubrics "
                                           f"({', '.join(sorted(rubrics))}), got {default!r}")
    with_reference = data.get("default_with_reference")
    if with_reference is not None and with_reference not in rubrics:
        raise where.error(None, "default_with_reference",
                          f"'default_with_reference' must name one of the rubrics "
                          f"({', '.join(sorted(rubrics))}), got {with_reference!r}")
    return RubricBook(rubrics, default, with_reference, source=str(path))


def _rubric(name: str, table: Any, where: _Locator) -> Rubric:
    if not _NAME.fullmatch(name) or len(name) > MAX_ID_CHARS:
        raise where.error(name, None, f"a rubric name must match {_NAME.pattern}")
    if not isinstance(table, dict):
        raise where.error(name, None, "expected a table [rubrics.NAME]")
    unknown = sorted(set(table) - _RUBRIC_KEYS)
    if unknown:
        raise where.error(name, unknown[0], f"unknown key {unknown[0]!r}; a rubric has "
                                            f"{', '.join(sorted(_RUBRIC_KEYS))}")
    user = table.get("user")
    if not isinstance(user, str) or not user.strip():
        raise where.error(name, "user", "'user' (the user message template) is required")
    system = table.get("system", SYSTEM_V1)
    if not isinstance(system, str) or not system.strip():
        raise where.error(name, "system", "'system' must be a non-empty string")
    fields = _template_fields(name, user, where)
    scale = table.get("scale", [int(SCALE_MIN), int(SCALE_MAX)])
    if (not isinstance(scale, list) or len(scale) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in scale)
            or not 0 <= scale[0] < scale[1] <= 100):
        raise where.error(name, "scale", f"'scale' must be [low, high], integers with "
                                         f"0 <= low < high <= 100, got {scale!r}")
    mode = table.get("score_mode")
    if mode is not None and mode not in _SCORE_MODES:
        raise where.error(name, "score_mode", f"'score_mode' must be one of "
                                              f"{', '.join(_SCORE_MODES)}, got {mode!r}")
    sources = table.get("data_sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
        raise where.error(name, "data_sources", "'data_sources' must be a list of strings")
    structured = table.get("structured_output")
    if structured is not None and not isinstance(structured, bool):
        raise where.error(name, "structured_output", "'structured_output' must be true or "
                                                     f"false, got {structured!r}")
    view = table.get("view")
    if view is not None and view not in _VIEWS:
        raise where.error(name, "view", f"'view' must be one of {', '.join(_VIEWS)}, "
                                        f"got {view!r}")
    return Rubric(name, system, user, (scale[0], scale[1]), mode, tuple(sources),
                  frozenset(fields), structured, view)


def _template_fields(name: str, template: str, where: _Locator) -> set[str]:
    fields: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise where.error(name, "user", f"bad template: {exc} (write literal braces as "
                                        "{{ and }})") from None
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in FIELDS:
            raise where.error(name, "user", f"unknown field {{{field_name}}} in the template; "
                                            f"fields: {', '.join(FIELDS)}")
        if spec or conversion:
            raise where.error(name, "user", f"field {{{field_name}}} takes no format spec "
                                            "or conversion")
        fields.add(field_name)
    if "response" not in fields:
        raise where.error(name, "user", "the template never shows the judge the {response}")
    return fields


@dataclass(frozen=True)
class _Locator:
    """Turns a problem into a ``ConfigError`` naming the file, the line and the rubric."""

    path: Path
    text: str

    def error(self, rubric: str | None, key: str | None, message: str) -> ConfigError:
        line = self._line(rubric, key)
        head = f"{self.path}:{line}" if line else str(self.path)
        return ConfigError(f"{head}: {f'rubric {rubric!r}: ' if rubric else ''}{message}")

    def _line(self, rubric: str | None, key: str | None) -> int | None:
        lines = self.text.splitlines()
        start = 0
        if rubric is not None:
            header = re.compile(rf"\s*\[\s*rubrics\s*\.\s*[\"']?{re.escape(rubric)}[\"']?\s*\]")
            found = next((n for n, line in enumerate(lines) if header.match(line)), None)
            if found is None:
                return None
            if key is None:
                return found + 1
            start = found + 1
        if key is None:
            return None
        assignment = re.compile(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for n in range(start, len(lines)):
            if rubric is not None and lines[n].lstrip().startswith("["):
                break
            if assignment.match(lines[n]):
                return n + 1
        return start or None


_BUILTIN = RubricBook(
    {"correctness": Rubric("correctness", SYSTEM_V1, CORRECTNESS_V1,
                           fields=frozenset({"prompt", "reference", "response"})),
     "quality": Rubric("quality", SYSTEM_V1, QUALITY_V1,
                       fields=frozenset({"prompt", "response"}))},
    default="quality", default_with_reference="correctness")
