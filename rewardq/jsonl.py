"""Reading item JSONL and writing result JSONL, for ``rewardq submit``."""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic_core import PydanticSerializationError

from rewardq.broker.errors import InvalidItemError
from rewardq.broker.schemas import ScoreItem, ScoreResult, parse_items


def read_items(path: Path) -> list[ScoreItem]:
    """Items from a JSONL file, one JSON object per non-empty line, all checked first.

    The whole file is read and checked before this returns, so a caller that sends
    what it returns sends nothing from a bad file. Each line must be UTF-8 (a leading
    byte-order mark is allowed), JSON, a valid item, and serializable back to JSON
    (pydantic refuses very deep nesting there).

    Raises:
        OSError: the file cannot be read (missing, a directory, no permission).
        InvalidItemError: the content is bad; every problem is listed with its line
            number (and item id and field, where there is one).
    """
    raw: list[Any] = []
    problems: list[str] = []
    lines: list[int] = []
    with path.open("rb") as f:
        for number, data in enumerate(f, start=1):
            if number == 1:
                data = data.removeprefix(codecs.BOM_UTF8)
            if not data.strip():
                continue
            value, problem = _decode_line(data)
            if problem is None:
                raw.append(value)
                lines.append(number)
            else:
                problems.append(f"line {number}: {problem}")
    try:
        items = parse_items(raw, label=lambda i: f"line {lines[i]}")
    except InvalidItemError as exc:
        problems.extend(exc.problems)
        items = []
    else:
        problems.extend(_unserializable(items, lines))
    if problems:
        raise InvalidItemError(problems)
    return items


def _decode_line(data: bytes) -> tuple[Any, str | None]:
    """``(value, None)`` for a line of JSON, else ``(None, what is wrong with it)``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"not valid UTF-8: {exc.reason} (byte 0x{data[exc.start]:02x} at "
                      f"byte {exc.start + 1} of the line)")
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to read"
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit limit
        return None, f"cannot read this JSON: {exc}"


def _unserializable(items: Sequence[ScoreItem], lines: Sequence[int]) -> list[str]:
    """One problem per item that cannot become the JSON the producer would send."""
    problems = []
    for item, number in zip(items, lines, strict=True):
        try:
            item.model_dump_json()
        except (PydanticSerializationError, ValueError, RecursionError) as exc:
            problems.append(f"line {number} (id={item.id!r}): field 'metadata': "
                            f"cannot be serialized to JSON: {exc}")
    return problems


def write_results(results: Sequence[ScoreResult], out: Path | None) -> None:
    """One JSON result per line, in input order, to ``out`` or stdout."""
    text = "".join(r.model_dump_json() + "\n" for r in results)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
