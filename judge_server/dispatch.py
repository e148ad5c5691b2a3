"""Which grader answers a request: a group prompt goes to ``group_grading``, anything
else to ``grading``; pure, no I/O. Kept apart from both so that neither imports the
other's importer (``group_grading`` grades each response with ``grading``)."""

from __future__ import annotations

from typing import Any

from rewardq.judge_server import group_grading
from rewardq.judge_server.config import JudgeConfig
from rewardq.judge_server.grading import (
    Grade,
    grade_item,
    parse_judge_prompt,
    quality_score,
    user_text,
)

__all__ = ["grade_messages", "grade_request", "shown_responses"]


def grade_request(messages: Any, config: JudgeConfig | None = None) -> Grade:
    """Grade a chat-completions ``messages`` list; never raises on odd input.

    The last ``user`` message is graded (see :func:`parse_judge_prompt`); without one,
    the text of all messages is graded with the quality heuristic. A group prompt
    (listwise or pairwise) is answered by ``rewardq.judge_server.group_grading``, with
    ``config``'s position bias.
    """
    text = user_text(messages)
    if group_grading.is_group_prompt(text):
        config = config or JudgeConfig()
        grade = group_grading.grade_group(text, position_bias=config.position_bias,
                                          margin=config.position_bias_margin,
                                          seed=config.seed)
        if grade is not None:
            return grade
    request = parse_judge_prompt(text)
    if request.rubric is None:
        score = quality_score("", request.response)
        return Grade(score, f"unrecognised prompt; quality heuristic gives {score}")
    return grade_item(request.prompt, request.response, request.reference)


def shown_responses(user_message: str) -> list[str]:
    """The RESPONSE section(s) of a rewardq judge prompt: one for an item prompt, one per
    response for a group prompt, none for a foreign prompt (what ``GET /stats`` inspects
    for thinking and end-of-turn tokens)."""
    if not user_message.startswith("rewardq-"):  # neither header: a foreign prompt
        return []
    if user_message.startswith("rewardq-group"):
        group = group_grading.parse_group_prompt(user_message)
        return [] if group is None else [text for _, text in group.responses]
    request = parse_judge_prompt(user_message)
    return [] if request.rubric is None else [request.response]


def grade_messages(messages: Any) -> int:
    """The score (1..10) the local judge gives a chat-completions ``messages`` list."""
    return grade_request(messages).score
