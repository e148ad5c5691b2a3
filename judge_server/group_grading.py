"""The local judge's group verdicts (listwise and pairwise prompts); pure, no I/O.

A group prompt's first line is ``rewardq-group v1 listwise`` or ``... pairwise`` (the
format ``rewardq.judge.group_prompts`` writes; repeated here, not imported: the judge stands in
for a third-party API). Each response is graded with the per-item rule
(:func:`rewardq.judge_server.grading.grade_item`: correctness against the REFERENCE when there is
one, else the quality heuristic), so a test can predict every answer:

* **listwise**: ``{"scores": {"A": <grade of A>, "B": ...}}``;
* **pairwise**: ``{"winner": "A" | "B" | "tie"}``, the higher grade winning, equal grades
  a tie; unless the judge has a *position bias* (``JudgeConfig.position_bias``): when the
  two grades differ by at most ``position_bias_margin`` (0: only ties), a draw fixed by
  the seed and the *unordered* pair (:func:`bias_draw`) below ``position_bias`` makes the
  response shown first win. The draw does not depend on the order, so a biased pair is
  biased both ways round: judged in both orders, each side wins once, which is exactly
  the tie an unbiased judge gives when the grades are equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from rewardq.judge_server.grading import Grade, first_line_of, grade_item, section

_HEADER = re.compile(r"rewardq-group v\d+ (listwise|pairwise)")


@dataclass(frozen=True)
class GroupRequest:
    """The parts of a group prompt: its mode, the shared prompt and reference, and the
    responses by label in the order shown."""

    mode: str
    prompt: str
    reference: str | None
    responses: tuple[tuple[str, str], ...]


def is_group_prompt(user_message: str) -> bool:
    """Whether ``user_message`` is a rewardq group prompt (its first line says so)."""
    return _HEADER.fullmatch(first_line_of(user_message).strip()) is not None


def parse_group_prompt(user_message: str) -> GroupRequest | None:
    """Read a group prompt back; ``None`` when it is not one or lacks a section.

    Responses are read in label order (A, B, ...): each runs to its own end marker
    followed by the next one's opener, the last to the last end marker, so a response
    that quotes a marker is still read whole.
    """
    header = _HEADER.fullmatch(first_line_of(user_message).strip())
    if header is None:
        return None
    prompt, pos = section(user_message, "PROMPT", 0)
    if prompt is None:
        return None
    first = user_message.find("<<<RESPONSE A>>>\n", pos)
    reference, after = section(user_message[:first], "REFERENCE", pos) if first >= 0 \
        else (None, pos)
    pos = after if reference is not None else pos
    responses: list[tuple[str, str]] = []
    k = 1
    while True:
        name, following = _label(k), _label(k + 1)
        opener = f"<<<RESPONSE {name}>>>\n"
        start = user_message.find(opener, pos)
        if start < 0:
            break
        start += len(opener)
        closer = f"\n<<<END RESPONSE {name}>>>"
        end = user_message.find(f"{closer}\n<<<RESPONSE {following}>>>\n", start)
        if end < 0:  # the last response
            end = user_message.rfind(closer)
            if end < start:
                return None
            responses.append((name, user_message[start:end]))
            break
        responses.append((name, user_message[start:end]))
        pos = end + len(closer) + 1
        k += 1
    if not responses:
        return None
    return GroupRequest(header.group(1), prompt, reference, tuple(responses))


def grade_group(user_message: str, *, position_bias: float = 0.0, margin: int = 0,
                seed: int = 0) -> Grade | None:
    """The judge's answer to a group prompt, as a ``Grade`` whose ``reply`` is the JSON to
    send; ``None`` when ``user_message`` is not a readable group prompt.

    Args:
        user_message: the request's user message.
        position_bias: pairwise only: how often (0..1) a close pair goes to the response
            shown first.
        margin: pairwise only: grades this close or closer count as close (0: ties).
        seed: the judge's seed, part of the bias draw.
    """
    request = parse_group_prompt(user_message)
    if request is None:
        return None
    grades = {name: grade_item(request.prompt, text, request.reference).score
              for name, text in request.responses}
    if request.mode == "listwise":
        reply = json.dumps({"scores": grades,
                            "reason": "each response graded by the per-item rule"})
        return Grade(max(grades.values()), "listwise", reply=reply)
    if len(request.responses) != 2:
        return None
    (_, first), (_, second) = request.responses
    winner = pairwise_winner(grades["A"], grades["B"], bias_draw(seed, first, second),
                             position_bias=position_bias, margin=margin)
    reply = json.dumps({"winner": winner, "reason": f"grades {grades['A']} vs {grades['B']}"})
    return Grade(max(grades.values()), "pairwise", reply=reply)


def pairwise_winner(first: int, second: int, draw: float, *, position_bias: float,
                    margin: int) -> str:
    """``"A"``, ``"B"`` or ``"tie"`` for grades ``first`` (shown first) and ``second``.

    Unbiased: the higher grade wins, equal grades tie. Biased: when
    ``|first - second| <= margin`` and ``draw < position_bias``, ``"A"`` wins.
    """
    if abs(first - second) <= margin and draw < position_bias:
        return "A"
    if first == second:
        return "tie"
    return "A" if first > second else "B"


def bias_draw(seed: int, first: str, second: str) -> float:
    """A number in [0, 1) fixed by ``seed`` and the two responses, whichever is first."""
    low, high = sorted((first, second))
    digest = hashlib.sha256(f"{seed}\x00{low}\x00{high}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _label(k: int) -> str:
    """The ``k``-th label (1-based): A .. Z, then AA, AB ... (``rewardq.judge.group_prompts``)."""
    label = ""
    while k:
        k, rest = divmod(k - 1, 26)
        label = chr(ord("A") + rest) + label
    return label
