"""Items for the fleet tests, and what the local judge deterministically answers."""

from __future__ import annotations

from typing import Any

from rewardq.judge.verdicts import normalize
from rewardq.judge_server.grading import expected_raw_score


def make_items(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` distinct items: correctness items (right and wrong) and quality items."""
    items = []
    for i in range(n):
        a, b = i % 97, i // 97
        if i % 3 == 2:  # quality rubric: no reference
            items.append({"id": f"{tag}-{i}", "prompt": f"[{tag}] Explain why {a} + {b} "
                          f"is {a + b}.", "response": f"Adding {a} and {b} gives {a + b}. "
                          + "Counting on from the larger number confirms it. " * (i % 4),
                          "uid": f"{tag}-g{i // 8}"})
        else:
            value = a + b if i % 2 == 0 else a + b + 1
            items.append({"id": f"{tag}-{i}", "prompt": f"[{tag}] What is {a} + {b}?",
                          "response": f"Let me think. The answer is {value}.",
                          "reference": str(a + b), "uid": f"{tag}-g{i // 8}"})
    return items


def expected(item: dict[str, Any]) -> tuple[float, float]:
    """(normalized score, raw score) the local judge gives ``item``."""
    raw = float(expected_raw_score(item["prompt"], item["response"], item.get("reference")))
    return normalize(raw), raw
