"""Reading item JSONL and writing result JSONL, for ``rewardq submit``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.errors import InvalidItemError
from broker.schemas import ScoreItem, ScoreResult, parse_items


def read_items(path: Path) -> list[ScoreItem]:
    """Items from a JSONL file, one JSON object per non-empty line.

    Raises:
        InvalidItemError: a line is not JSON or an item is invalid; every problem is
            listed with its line number, item id and field.
    """
    raw: list[Any] = []
    problems: list[str] = []
    lines: list[int] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
                lines.append(number)
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not valid JSON: {exc.msg}")
    try:
        items = parse_items(raw, label=lambda i: f"line {lines[i]}")
    except InvalidItemError as exc:
        problems.extend(exc.problems)
        items = []
    if problems:
        raise InvalidItemError(problems)
    return items


def write_results(results: Sequence[ScoreResult], out: Path | None) -> None:
    """One JSON result per line, in input order, to ``out`` or stdout."""
    text = "".join(r.model_dump_json() + "\n" for r in results)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
