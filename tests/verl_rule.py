"""The rule score the verl tests give verl as ``custom_reward_function`` (a file path)."""

from __future__ import annotations

from typing import Any

from rewardq.producer.rewards import exact_final_answer


def compute_score(data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: Any = None, **_: Any) -> float:
    """1.0 when the response's final answer equals the ground truth."""
    return exact_final_answer(data_source, solution_str, ground_truth, extra_info)
