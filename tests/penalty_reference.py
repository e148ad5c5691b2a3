"""Plain-Python reference of the length penalties, one sample at a time.

Written from the formulas in the docstrings of ``rewardq.producer.penalties`` as literally
as possible and independently of its code (no torch, no numpy), so the tests compare two
implementations rather than one implementation with itself. The benchmark times it as the
per-sample loop.
The sign convention is ``rewardq.producer.penalties``': a *penalty* is non-negative and
subtracted; DAPO's overlong term is non-positive and added.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from rewardq.producer.config import LengthPenaltyConfig


def response_length(mask_row: Sequence[int], prompt_len: int) -> int:
    """L: the number of 1s in the response part of one attention-mask row."""
    return sum(int(x) for x in mask_row[prompt_len:])


def group_medians(lengths: Sequence[int], uids: Sequence[object | None]) -> list[float]:
    """M of every sample: the median L of its uid group; a sample without uid is alone."""
    members: dict[object, list[int]] = {}
    for length, uid in zip(lengths, uids, strict=True):
        if uid is not None:
            members.setdefault(uid, []).append(length)
    medians = {uid: float(statistics.median(group)) for uid, group in members.items()}
    return [
        float(length) if uid is None else medians[uid]
        for length, uid in zip(lengths, uids, strict=True)
    ]


def trapezoid(
    length: float, median: float, peak_ratio: float, outer_ratio: float, max_penalty: float
) -> float:
    """The group-median trapezoid penalty of one sample, the cases in order."""
    L, M, p, o = length, median, peak_ratio, outer_ratio  # noqa: N806 - the formula's names
    if not M > 0:
        return 0.0
    if M * (1 - p) <= L <= M * (1 + p):
        return 0.0
    if M * (1 - o) <= L < M * (1 - p):
        return max_penalty * (M * (1 - p) - L) / (M * (1 - p) - M * (1 - o))
    if M * (1 + p) < L <= M * (1 + o):
        return max_penalty * (L - M * (1 + p)) / (M * (1 + o) - M * (1 + p))
    return max_penalty


def overlong_term(length: float, max_resp_len: int, buffer_len: int, factor: float) -> float:
    """DAPO's overlong reward term of one sample (non-positive, added to the reward)."""
    expected = max_resp_len - buffer_len
    return min(-(length - expected) / buffer_len * factor, 0)


def length_penalties(
    lengths: Sequence[int], uids: Sequence[object | None] | None, cfg: LengthPenaltyConfig
) -> list[float]:
    """The configured non-negative penalty of every sample, by a loop over samples."""
    if uids is None:
        uids = [None] * len(lengths)
    medians = group_medians(lengths, uids)
    out: list[float] = []
    for length, median in zip(lengths, medians, strict=True):
        if not cfg.enable:
            out.append(0.0)
        elif cfg.penalty_shape == "overlong":
            assert cfg.max_resp_len is not None and cfg.overlong_buffer_len is not None
            out.append(
                -overlong_term(
                    length, cfg.max_resp_len, cfg.overlong_buffer_len, cfg.overlong_penalty_factor
                )
            )
        else:
            out.append(trapezoid(length, median, cfg.peak_ratio, cfg.outer_ratio, cfg.max_penalty))
    return out


def reward_rows(scores: Sequence[float], lengths: Sequence[int], width: int) -> list[list[float]]:
    """verl's token-level reward rows: the score on the last valid token (index 0 if none)."""
    rows = []
    for score, length in zip(scores, lengths, strict=True):
        row = [0.0] * width
        row[max(length - 1, 0)] = float(score)
        rows.append(row)
    return rows
