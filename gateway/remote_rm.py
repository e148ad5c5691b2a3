"""What the remote-reward-model protocols share: how a sample becomes an item, and how a
result becomes a reward.

OpenRLHF (:mod:`rewardq.gateway.openrlhf`) and slime (:mod:`rewardq.gateway.slime`) send a prompt, a
response (or the whole decoded sequence) and a dataset ``label``, and read back a
number. What rewardq makes of the label is a choice (:class:`RewardMapping`), set per
deployment (``REWARDQ_GATEWAY_*``) and overridable per endpoint URL with query
parameters, so one gateway serves a math run and a chat run at once, e.g.
``/get_reward?label_as=metadata``.

**Labels** (``label_as=reference``, the default) are read by one rule,
:func:`reference_of`: a string or a number is the reference answer; a dict's
``ground_truth``, ``answer``, ``label`` or ``reference`` key (the first present) is read
by the same rule; so is a list's only element. Anything else (``null``, ``""``, ``true``,
a dict without those keys, a list of several) refuses the request with 422 naming the
label: judging without the reference would silently switch to the quality rubric and
score right and wrong answers alike. A run without references says so with
``label_as=metadata`` (the label is kept in the item's metadata only).

**Rewards**: an ``ok`` result's score; a rollout with no final answer (``no_answer``)
gets ``no_answer_reward`` (default 0.0, the judge's lowest score); any other item that
could not be scored gets ``failed_reward`` when set. Without it the request fails: 502
``not_scored`` when an item failed for good, 504 ``timeout`` when it was still failing
transiently at the deadline (a retry finds every verdict that succeeded in the cache);
the body's ``items`` names each such item, its status and why.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from rewardq.broker.schemas import ResultStatus, ScoreResult
from rewardq.broker.settings import Settings
from rewardq.gateway.errors import GatewayRequestError
from rewardq.gateway.scoring import is_transient

LabelAs = Literal["reference", "metadata"]
ResponseFrom = Literal["strip_prompt", "query"]
_LABEL_AS: tuple[LabelAs, ...] = ("reference", "metadata")
_RESPONSE_FROM: tuple[ResponseFrom, ...] = ("strip_prompt", "query")
#: Keys of a dict label that hold the reference answer, in the order they are looked for.
REFERENCE_KEYS = ("ground_truth", "answer", "label", "reference")
#: Items a 502/504 body names one by one (the message counts them all).
NAMED_ITEMS = 20
_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


class LabelError(ValueError):
    """A label that holds no reference answer by the rule of :func:`reference_of`."""


def reference_of(label: Any) -> str:
    """The reference answer in a dataset label (see the module docstring for the rule).

    Raises:
        LabelError: the label holds none; the message says why.
    """
    return _reference(label, depth=0)


def _reference(label: Any, depth: int) -> str:
    if isinstance(label, str):
        if not label.strip():
            raise LabelError("an empty string is no reference answer")
        return label
    if isinstance(label, bool) or label is None:
        raise LabelError(f"{json.dumps(label)} is no reference answer")
    if isinstance(label, int | float):
        if not math.isfinite(label):
            raise LabelError(f"{label} is no reference answer")
        return json.dumps(label)
    if depth < 4 and isinstance(label, dict):
        for key in REFERENCE_KEYS:
            if key in label:
                return _reference(label[key], depth + 1)
        raise LabelError(f"a dict label needs one of the keys {', '.join(REFERENCE_KEYS)}")
    if depth < 4 and isinstance(label, list):
        if len(label) != 1:
            raise LabelError(f"a list label needs exactly one element, not {len(label)}")
        return _reference(label[0], depth + 1)
    raise LabelError(f"a {type(label).__name__} label is no reference answer")


@dataclass(frozen=True)
class RewardMapping:
    """How remote-RM fields map onto items, and results onto rewards.

    Attributes:
        label_as: ``reference``: a label becomes the item's reference answer (the judge's
            correctness rubric) by :func:`reference_of`, and a label without one refuses
            the request; ``metadata``: it is kept in ``metadata["label"]`` only (the
            quality rubric).
        response_from: OpenRLHF only: ``strip_prompt`` judges the part of its ``query``
            after the prompt; ``query`` judges the whole decoded sequence.
        failed_reward: the reward of an item that was not scored; ``None``: the request
            fails (502 or 504).
        no_answer_reward: the reward of a rollout with no final answer; ``None``: such
            an item counts as not scored.
        extra_logs: OpenRLHF only: answer ``extra_logs`` (OpenRLHF 0.8.x cannot read them).
        timeout_s: the request's deadline in seconds; ``None``: the deployment's.
    """

    label_as: LabelAs = "reference"
    response_from: ResponseFrom = "strip_prompt"
    failed_reward: float | None = None
    no_answer_reward: float | None = 0.0
    extra_logs: bool = True
    timeout_s: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RewardMapping:
        """The deployment's mapping (``REWARDQ_GATEWAY_LABEL_AS`` and friends)."""
        return cls(label_as=settings.gateway_label_as,
                   response_from=settings.gateway_response_from,
                   failed_reward=settings.gateway_failed_reward,
                   no_answer_reward=settings.gateway_no_answer_reward,
                   extra_logs=settings.gateway_openrlhf_extra_logs)

    def with_query(self, params: Mapping[str, str], *, max_timeout_s: float) -> RewardMapping:
        """This mapping with ``label_as``, ``response_from``, ``failed_reward``,
        ``no_answer_reward``, ``extra_logs`` and ``timeout_s`` from an endpoint URL's query
        string.

        Raises:
            GatewayRequestError: 422 for an unknown value.
        """
        mapping = self
        label_as = params.get("label_as")
        if label_as is not None:
            if label_as not in _LABEL_AS:
                raise _bad_param("label_as", label_as, _LABEL_AS)
            mapping = replace(mapping, label_as=label_as)
        response_from = params.get("response_from")
        if response_from is not None:
            if response_from not in _RESPONSE_FROM:
                raise _bad_param("response_from", response_from, _RESPONSE_FROM)
            mapping = replace(mapping, response_from=response_from)
        failed = params.get("failed_reward")
        if failed is not None:
            mapping = replace(mapping, failed_reward=_number("failed_reward", failed))
        no_answer = params.get("no_answer_reward")
        if no_answer is not None:
            mapping = replace(mapping, no_answer_reward=_number("no_answer_reward", no_answer))
        extra_logs = params.get("extra_logs")
        if extra_logs is not None:
            if extra_logs.lower() not in _FALSE + _TRUE:
                raise _bad_param("extra_logs", extra_logs, ("0", "1"))
            mapping = replace(mapping, extra_logs=extra_logs.lower() in _TRUE)
        timeout = params.get("timeout_s")
        if timeout is not None:
            seconds = _number("timeout_s", timeout)
            if not 0 < seconds <= max_timeout_s:
                raise _bad_param("timeout_s", timeout,
                                 (f"a number of seconds in (0, {max_timeout_s:g}] "
                                  "(REWARDQ_CHUNK_DEADLINE_S)",))
            mapping = replace(mapping, timeout_s=seconds)
        return mapping

    def item(self, item_id: str, prompt: str, response: str, label: Any, *,
             where: str) -> dict[str, Any]:
        """The item JSON for one sample (validated later, item by item).

        Args:
            where: names the sample in an error (``labels[3]``, ``label``).

        Raises:
            GatewayRequestError: 422 naming the label, when ``label_as`` is ``reference``
                and the label holds no reference answer.
        """
        item: dict[str, Any] = {"id": item_id, "prompt": prompt, "response": response}
        if self.label_as == "reference":
            try:
                item["reference"] = reference_of(label)
            except LabelError as exc:
                shown = json.dumps(label, default=str)
                shown = shown if len(shown) <= 200 else shown[:200] + "..."
                raise GatewayRequestError(
                    422, "invalid_request",
                    f"{where} = {shown}: {exc}; a label must hold the reference answer "
                    f"(a string or number, a dict's {'/'.join(REFERENCE_KEYS)}, or a one-"
                    f"element list), or use ?label_as=metadata to judge without one",
                    problems=[{"field": where, "message": str(exc)}]) from None
        elif label is not None:
            item["metadata"] = {"label": label}
        return item

    def rewards(self, results: Sequence[ScoreResult]) -> list[float]:
        """One reward per result (see the module docstring).

        Raises:
            GatewayRequestError: 502 ``not_scored`` when an item failed for good, else 504
                ``timeout`` when one was still failing at the deadline; only when
                ``failed_reward`` is unset. Its ``items`` name them.
        """
        rewards: list[float | None] = [self._reward(r) for r in results]
        unscored = [i for i, reward in enumerate(rewards) if reward is None]
        if unscored and self.failed_reward is None:
            raise _not_scored(results, unscored)
        return [reward if reward is not None else float(self.failed_reward or 0.0)
                for reward in rewards]

    def _reward(self, result: ScoreResult) -> float | None:
        status = ResultStatus(result.status)
        if status is ResultStatus.OK and result.score is not None:
            return result.score
        if status is ResultStatus.NO_ANSWER and self.no_answer_reward is not None:
            return self.no_answer_reward
        return None


def _not_scored(results: Sequence[ScoreResult], unscored: list[int]) -> GatewayRequestError:
    permanent = [i for i in unscored if not is_transient(results[i])]
    named = [{"index": i, "id": results[i].id, "status": ResultStatus(results[i].status).value,
              "error": results[i].error, "permanent": i in permanent}
             for i in unscored[:NAMED_ITEMS]]
    detail = "; ".join(f"[{n['index']}] {n['status']}: {n['error']}" for n in named[:3])
    if permanent:
        return GatewayRequestError(
            502, "not_scored",
            f"{len(unscored)} of {len(results)} item(s) could not be scored, {len(permanent)} "
            f"of them for good ({detail}); a retry gets the same answer for those: set "
            f"REWARDQ_GATEWAY_FAILED_REWARD (or ?failed_reward=) to give them a fixed reward",
            items=named)
    return GatewayRequestError(
        504, "timeout",
        f"{len(unscored)} of {len(results)} item(s) were still failing transiently at the "
        f"request's deadline ({detail}); a retry finds the verdicts that succeeded cached",
        items=named)


def _number(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _bad_param(name, value, ("a number",)) from None
    if not math.isfinite(number):
        raise _bad_param(name, value, ("a finite number",))
    return number


def _bad_param(name: str, value: str, allowed: Sequence[str]) -> GatewayRequestError:
    return GatewayRequestError(422, "invalid_request",
                               f"query parameter {name}={value!r}: expected "
                               f"{' or '.join(allowed)}")
