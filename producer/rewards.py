"""The reward of a sample, as every trainer adapter computes it::

    reward = rule_score + reward_coefficient * judge_score - penalty_scale * penalty

``rule_score`` is the trainer's own check (``compute_score``; :func:`exact_final_answer`
by default), ``judge_score`` the judge's normalized score in [0, 1] (0 when the sample was
not asked), ``penalty`` the non-negative length penalty of
:mod:`rewardq.producer.penalties`. A sample the judge was asked about whose result is not
``ok`` gets ``on_judge_failure`` (``rule_only``: the judge term is 0; ``zero``; ``nan``)
instead of a silent 0, and its ``judge_status`` says why (:func:`judge_status`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.producer.config import LengthPenaltyConfig

__all__ = ["DISABLED", "SKIPPED", "combine_rewards", "exact_final_answer", "judge_score",
           "judge_status"]

#: ``judge_status`` of a sample the judge was not asked about (``judge_when="correct_only"``
#: and a rule score <= 0).
SKIPPED = "skipped"
#: ``judge_status`` of every sample when ``enable_openai_reward`` is false.
DISABLED = "disabled"


def combine_rewards(rule: Tensor, judge: Sequence[ScoreResult | None], penalty: Tensor,
                    cfg: LengthPenaltyConfig) -> Tensor:
    """``rule + reward_coefficient * judge - penalty_scale * penalty``, judge failures handled.

    Args:
        rule: ``(batch,)`` rule scores.
        judge: per sample, its judge result, or ``None`` if it was not judged (judge term 0).
        penalty: ``(batch,)`` non-negative length penalties.
        cfg: supplies ``reward_coefficient``, ``penalty_scale`` and ``on_judge_failure``
            (``rule_only``: the judge term is 0; ``zero``: the reward is 0; ``nan``: NaN).

    Returns:
        ``(batch,)`` rewards on the device of ``penalty``, in float64 (float32 on MPS).
    """
    device = penalty.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    judge_scores = [r.score if r is not None and r.score is not None
                    and r.status is ResultStatus.OK else 0.0 for r in judge]
    failed = [r is not None and r.status is not ResultStatus.OK for r in judge]
    judge_t = torch.tensor(judge_scores, dtype=dtype, device=device)
    failed_t = torch.tensor(failed, dtype=torch.bool, device=device)
    reward = (rule.to(device=device, dtype=dtype) + cfg.reward_coefficient * judge_t
              - cfg.penalty_scale * penalty.to(dtype))
    if cfg.on_judge_failure == "zero":
        reward = torch.where(failed_t, torch.zeros_like(reward), reward)
    elif cfg.on_judge_failure == "nan":
        reward = torch.where(failed_t, torch.full_like(reward, math.nan), reward)
    return reward


def judge_status(result: ScoreResult | None, cfg: LengthPenaltyConfig) -> str:
    """A sample's ``judge_status``: its result's ``ResultStatus`` value, or, for a sample
    the judge was not asked about, :data:`DISABLED` (the judge is off) or :data:`SKIPPED`."""
    if result is not None:
        return result.status.value
    return DISABLED if not cfg.enable_openai_reward else SKIPPED


def judge_score(result: ScoreResult | None) -> float:
    """A sample's ``judge_score`` as the adapters report it: the normalized score, NaN
    when there is none (not asked, or a result without a verdict)."""
    return result.score if result is not None and result.score is not None else math.nan


# --------------------------------------------------------------------------- rule score

_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_MARKER = re.compile(r"(?:####|answer\s*(?:is\b\s*:?|:))", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _canonical(answer: str) -> str:
    text = answer.strip().strip("$*` ").rstrip(".").strip().lower()
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    return text


def _final_answer(text: str) -> str | None:
    boxed = _BOXED.findall(text)
    if boxed:
        return _canonical(boxed[-1])
    markers = list(_MARKER.finditer(text))
    if markers:
        rest = text[markers[-1].end():].strip().split("\n", 1)[0]
        candidate = _canonical(rest.split(". ", 1)[0])
        if candidate:
            return candidate
    numbers = _NUMBER.findall(text)
    return _canonical(numbers[-1]) if numbers else None


def exact_final_answer(data_source: str, solution_str: str, ground_truth: Any,
                       extra_info: Any = None) -> float:
    """The built-in rule score: 1.0 if the response's final answer equals the ground truth.

    The final answer is the last ``\\boxed{...}``, else what follows the last "####" or
    "answer is"/"answer:" up to the end of the sentence, else the last number; both
    sides are compared after stripping ``$``/``*``/backticks, a trailing period, case,
    and a number's thousands commas and trailing decimal zeros (``"1,000.50"`` ==
    ``"1000.5"``). The ground truth is read the same way (GSM8K's ``"... #### 42"`` works).

    Args:
        data_source: unused; part of verl's ``compute_score`` signature.
        solution_str: the decoded response.
        ground_truth: the reference answer (anything ``str()`` turns into one), or None.
        extra_info: unused.

    Returns:
        1.0 or 0.0 (0.0 when there is no ground truth or no final answer).
    """
    if ground_truth is None:
        return 0.0
    want = _final_answer(str(ground_truth)) or _canonical(str(ground_truth))
    got = _final_answer(solution_str)
    return 1.0 if got is not None and got == want else 0.0
